"""The built-in layer schedules (`static`, `top_down`, `custom`, the `projector` window), registered as a pluggy plugin.

A third-party package adds a schedule the same way: implement `register_schedules(register)` and call
`register(name, schedule_class)` with a subclass of `mmtuning_plugin.config.LayerSchedule` (its fields are the
YAML options; `stages(targeted_layers, num_layers, where)` returns the `Stage` list).
"""

from __future__ import annotations

from ..config import CustomSchedule, LayerSchedule, ProjectorSchedule, StaticSchedule, TopDownSchedule
from ..hookspecs import hookimpl

BUILTIN_SCHEDULES: dict[str, type[LayerSchedule]] = {
    "static": StaticSchedule,
    "top_down": TopDownSchedule,
    "custom": CustomSchedule,
    "projector": ProjectorSchedule,
}


@hookimpl
def register_schedules(register):
    for name, schedule_class in BUILTIN_SCHEDULES.items():
        register(name, schedule_class)
