"""Progressive-layer schedules and per-modality learning rates, one module per concern.

A schedule says which targeted layers of a modality train at optimizer step N. It is a list of stages
(`at` a step or a fraction of training, `layers` on from then), so the active set at step N is a pure
function of N and the total step count: a run resumed mid-schedule equals one never interrupted.

Mechanics (docs/schedules.md): every adapter parameter is in the optimizer from step 0, in its
modality's group. A parameter of an inactive stage gets `requires_grad=False` (no backward below the
lowest active layer, no gradient memory) and, before every optimizer step, `grad=None`; PyTorch
optimizers skip parameters whose grad is None, so an inactive adapter sees no update, no weight
decay and no moment drift. Under DDP without `find_unused_parameters` the scheduler only drops grads
(`mode="grad"`), because the reducer expects a gradient for every parameter it registered.

Modules: the spec models (`static`, `top_down`, `custom`, the projector window) and their `LayerSchedule`
base are schema, in config.py; `builtin.py` registers them; `plan.py` resolves them against a target plan
(pure); `lr.py` builds the optimizer groups; `runtime.py` applies a plan while training.
"""

from __future__ import annotations

from ..config import LayerSchedule, Stage, parse_schedule
from .lr import optimizer_groups
from .plan import Active, SchedulePlan, active_of, parameter_slots, resolve_at, schedule_plan, targeted_layers
from .runtime import LayerScheduler, describe_active, schedule_callback, scheduler_mode

__all__ = ["Active", "LayerSchedule", "LayerScheduler", "SchedulePlan", "Stage", "active_of", "describe_active",
           "optimizer_groups", "parameter_slots", "parse_schedule", "resolve_at", "schedule_callback",
           "schedule_plan", "scheduler_mode", "targeted_layers"]
