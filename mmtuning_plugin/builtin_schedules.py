"""The built-in layer schedules (`static`, `top_down`, `custom`), registered as a pluggy plugin.

A third-party package adds a schedule the same way: implement `register_schedules(register)` and call
`register(name, factory)`, where `factory(options: dict)` returns an object with
`stages(targeted_layers, num_layers, where) -> list[schedule.Stage]` (see mmtuning_plugin/schedule.py).
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .schedule import BUILTIN_SCHEDULES


@hookimpl
def register_schedules(register):
    for name, factory in BUILTIN_SCHEDULES.items():
        register(name, factory)
