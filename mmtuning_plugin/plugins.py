"""The plugin manager: loads entry points of group `mmtuning` and collects what they register."""

from __future__ import annotations

import functools
from typing import Any, Callable

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "mmtuning"
# Entry-point name -> module. The same names are declared in pyproject.toml, so an installed copy's
# entry points are recognised as already registered instead of being registered twice.
BUILTIN_PLUGINS = {"builtin_architectures": "mmtuning_plugin.arch.builtin",
                   "builtin_losses": "mmtuning_plugin.losses.builtin",
                   "builtin_schedules": "mmtuning_plugin.builtin_schedules"}


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    import importlib

    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    for name, dotted in BUILTIN_PLUGINS.items():
        manager.register(importlib.import_module(dotted), name=name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module at runtime (what an entry point does at start-up)."""
    manager = plugin_manager()
    if not manager.is_registered(plugin):
        manager.register(plugin, name=name)
    _collected.cache_clear()


def unregister_plugin(plugin: Any) -> None:
    plugin_manager().unregister(plugin)
    _collected.cache_clear()


@functools.lru_cache(maxsize=None)
def _collected(hook_name: str) -> tuple[tuple[tuple, dict], ...]:
    calls: list[tuple[tuple, dict]] = []

    def register(*args, **kwargs) -> None:
        calls.append((args, kwargs))

    getattr(plugin_manager().hook, hook_name)(register=register)
    return tuple(calls)


def collect(hook_name: str, build: Callable[..., Any]) -> list[Any]:
    """Everything registered through `hook_name`, each `register(...)` call turned into `build(...)`."""
    return [build(*args, **kwargs) for args, kwargs in _collected(hook_name)]
