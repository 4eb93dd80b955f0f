"""mmtuning's extension API: pluggy hooks, entry point group `mmtuning`.

A plugin module implements any of these with `@mmtuning_plugin.hookimpl`. The built-in architectures,
losses and schedules register through the same hooks, so a third-party package is a first-class citizen.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mmtuning")
hookimpl = pluggy.HookimplMarker("mmtuning")


@hookspec
def register_architectures(register):
    """Call `register(ModalityMap(...))` for each model type this plugin knows."""


@hookspec
def register_losses(register):
    """Call `register(name, loss_factory)` for each alignment or regularization loss."""


@hookspec
def register_schedules(register):
    """Call `register(name, schedule_factory)` for each layer schedule."""
