"""mmtuning's extension API: pluggy hooks, entry point group `mmtuning`.

A plugin module implements any of these with `@mmtuning_plugin.hookimpl`. The built-in architectures,
losses, schedules and adapter methods register through the same hooks, so a third-party package is a first-class citizen.
Each hook's `register(...)` signature and the type it checks are rows of `plugins.REGISTRIES`.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mmtuning")
hookimpl = pluggy.HookimplMarker("mmtuning")


@hookspec
def register_architectures(register):
    """Call `register(modality_map: ModalityMap)` for each model type family this plugin knows (or
    `register(Refusal(model_types, reason))` for a type it refuses on purpose, with the reason)."""


@hookspec
def register_losses(register):
    """Call `register(name: str, loss_class: type[AlignmentLoss])` for each alignment or regularization loss."""


@hookspec
def register_schedules(register):
    """Call `register(name: str, schedule_class: type[LayerSchedule])` for each layer schedule."""


@hookspec
def register_methods(register):
    """Call `register(name: str, method_class: type[AdapterMethod])` for each adapter method (what `method:` names)."""
