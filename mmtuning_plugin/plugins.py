"""The plugin manager: loads entry points of group `mmtuning` and collects what they register.

Each kind of registered thing (architectures, losses, schedules, adapter methods) is one `Registry` row below: its hook, the
`register(...)` signature a plugin calls, and the type every call must pass. Every kind is collected and
checked by the same code, which also remembers which plugin registered what, so `mmtune plugins` can show
it and say where one plugin overrode a name of another (the later plugin wins; the built-ins load first).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import MMTuningError

ENTRY_POINT_GROUP = "mmtuning"
# Entry-point name -> module. The same names are declared in pyproject.toml, so an installed copy's
# entry points are recognised as already registered instead of being registered twice.
BUILTIN_PLUGINS = {"builtin_architectures": "mmtuning_plugin.arch.builtin",
                   "builtin_losses": "mmtuning_plugin.losses.builtin",
                   "builtin_schedules": "mmtuning_plugin.schedules.builtin",
                   "builtin_methods": "mmtuning_plugin.methods.builtin"}


@dataclass(frozen=True)
class Registry:
    """One kind of registered object. `expects` names the class (`module:Class`, or `module:A|B` for either, imported only when checking,
    so this module stays below the features); `names_of` gives the names one registration claims."""

    kind: str
    hook: str
    signature: str
    expects: str
    subclass: bool  # register a class (losses, schedules) rather than an instance (modality maps)
    names_of: Callable[[tuple], tuple[str, ...]]

    def expected(self) -> tuple[type, ...]:
        module, _, names = self.expects.partition(":")
        loaded = importlib.import_module(module)
        return tuple(getattr(loaded, name) for name in names.split("|"))

    def check(self, plugin: str, args: tuple, kwargs: dict) -> tuple[tuple[str, ...], Any]:
        """The names and the object of one `register(...)` call, or an error naming the plugin and the signature."""
        wanted = self.expected()
        arity = 1 if self.kind == "architectures" else 2
        values = tuple(args) + tuple(kwargs.values())
        obj = values[-1] if len(values) == arity else None
        fits = obj is not None and (isinstance(obj, type) and issubclass(obj, wanted) if self.subclass
                                    else isinstance(obj, wanted))
        if arity == 2 and fits and not isinstance(values[0], str):
            fits = False
        if not fits:
            shown = ", ".join([*map(_short, args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
            classes = " or ".join(f"{cls.__module__}.{cls.__name__}" for cls in wanted)
            what = f"a subclass of {classes}" if self.subclass else f"a {classes}"
            raise MMTuningError(f"Plugin '{plugin}': its {self.hook} called register({shown}); call "
                                f"{self.signature}, i.e. pass {what} instead.")
        return self.names_of(values), obj


def _short(value: Any) -> str:
    text = value.__name__ if isinstance(value, type) else type(value).__name__
    return repr(value) if isinstance(value, str) else text


REGISTRIES: dict[str, Registry] = {r.kind: r for r in (
    Registry("architectures", "register_architectures", "register(modality_map: ModalityMap | Refusal)",
             "mmtuning_plugin.arch:ModalityMap|Refusal", False, lambda values: tuple(values[0].model_types)),
    Registry("losses", "register_losses", "register(name: str, loss_class: type[AlignmentLoss])",
             "mmtuning_plugin.losses.base:AlignmentLoss", True, lambda values: (values[0],)),
    Registry("schedules", "register_schedules", "register(name: str, schedule_class: type[LayerSchedule])",
             "mmtuning_plugin.config:LayerSchedule", True, lambda values: (values[0],)),
    Registry("methods", "register_methods", "register(name: str, method_class: type[AdapterMethod])",
             "mmtuning_plugin.methods.base:AdapterMethod", True, lambda values: (values[0],)),
)}


@dataclass(frozen=True)
class Registration:
    plugin: str
    kind: str
    names: tuple[str, ...]
    obj: Any


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
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
    registrations.cache_clear()


def unregister_plugin(plugin: Any) -> None:
    plugin_manager().unregister(plugin)
    registrations.cache_clear()


@functools.lru_cache(maxsize=None)
def registrations(kind: str) -> tuple[Registration, ...]:
    """Every `register(...)` call of `kind`, checked, in plugin registration order (built-ins first)."""
    registry = REGISTRIES[kind]
    manager = plugin_manager()
    found: list[Registration] = []
    for impl in getattr(manager.hook, registry.hook).get_hookimpls():
        calls: list[tuple[tuple, dict]] = []
        impl.function(lambda *args, **kwargs: calls.append((args, kwargs)))
        for args, kwargs in calls:
            names, obj = registry.check(impl.plugin_name, args, kwargs)
            found.append(Registration(impl.plugin_name, kind, names, obj))
    return tuple(found)


def registered(kind: str) -> dict[str, Any]:
    """name -> registered object of `kind`; for a name registered twice, the later plugin's wins."""
    return {name: r.obj for r in registrations(kind) for name in r.names}


def overrides(kind: str) -> list[dict[str, str]]:
    """Names of `kind` that a later plugin registered again: `{name, plugin (the winner), overrode}`."""
    owner: dict[str, str] = {}
    found = []
    for registration in registrations(kind):
        for name in registration.names:
            if name in owner and owner[name] != registration.plugin:
                found.append({"kind": kind, "name": name, "plugin": registration.plugin, "overrode": owner[name]})
            owner[name] = registration.plugin
    return found


def plugins_report() -> list[dict[str, Any]]:
    """Per plugin: where it comes from, the hooks it implements and the names it registered, per kind."""
    manager = plugin_manager()
    report = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(impl_hook for impl_hook in dir(manager.hook)
                       if not impl_hook.startswith("_") and any(
                           i.plugin is plugin for i in getattr(manager.hook, impl_hook).get_hookimpls()))
        registered_names = {kind: sorted(n for r in registrations(kind) if r.plugin == name for n in r.names)
                            for kind in REGISTRIES}
        report.append({"name": name, "module": getattr(plugin, "__name__", type(plugin).__name__),
                       "builtin": name in BUILTIN_PLUGINS, "hooks": hooks,
                       "registered": {k: v for k, v in registered_names.items() if v}})
    return report
