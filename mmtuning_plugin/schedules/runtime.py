"""Applying a schedule while training: `LayerScheduler` (host-free) and the transformers `TrainerCallback` that
drives it from `state.global_step` (transformers imported lazily, so the core stays host-free)."""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from torch import nn

from .plan import Active, SchedulePlan, Slot, parameter_slots, resolve_at, schedule_plan


logger = logging.getLogger("mmtuning.schedule")


class LayerScheduler:
    """Applies a `SchedulePlan` to a model, host-free: `apply(step)` before the forward of an update,
    `drop_inactive_grads()` before the optimizer step. `mode="requires_grad"` also skips the backward of
    inactive stages; `mode="grad"` (for DDP without find_unused_parameters) lets DDP see every grad but zeroes
    inactive ones as they are computed, so gradient clipping and the logged grad_norm (the Trainer clips
    before `on_pre_optimizer_step`) count only the active stage, then drops them before the step."""

    def __init__(self, model: nn.Module, plan, schedule: SchedulePlan, total_steps: Optional[int],
                 mode: Literal["requires_grad", "grad"] = "requires_grad"):
        self.schedule, self.total_steps, self.mode = schedule, total_steps, mode
        slots = parameter_slots(model, plan)
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in slots}
        self.slots = {name: slot for name, slot in slots.items() if slot.modality in schedule.stages}
        self.current: Optional[dict[str, Active]] = None
        self.inactive: list[nn.Parameter] = []
        self._inactive_ids: set[int] = set()
        self._gates = [param.register_hook(self._gate(param)) for param in self.params.values()] if mode == "grad" else []
        for stages in schedule.stages.values():  # fail at train begin, not mid-run
            for stage in stages:
                resolve_at(stage.at, total_steps)

    def active_names(self, step: int) -> set[str]:
        active = self.schedule.active(step, self.total_steps)
        return {name for name, slot in self.slots.items() if _is_on(slot, active[slot.modality])} | \
               {name for name in self.params if name not in self.slots}

    def apply(self, step: int) -> Optional[dict[str, Active]]:
        """Set the active stage for `step`; returns the new active sets when they changed, else None."""
        active = self.schedule.active(step, self.total_steps)
        if active == self.current:
            return None
        on = self.active_names(step)
        self.inactive = [p for name, p in self.params.items() if name not in on]
        self._inactive_ids = {id(p) for p in self.inactive}
        if self.mode == "requires_grad":
            for name, param in self.params.items():
                param.requires_grad_(name in on)
        self.current = active
        return active

    def _gate(self, param: nn.Parameter):
        def zero_if_inactive(grad):
            return grad.new_zeros(()).expand_as(grad) if id(param) in self._inactive_ids else grad
        return zero_if_inactive

    def drop_inactive_grads(self) -> None:
        for param in self.inactive:
            param.grad = None

    def restore(self) -> None:
        """Everything trainable again (after training: saving, merging and evaluation see a normal model)."""
        for param in self.params.values():
            param.requires_grad_(True)
        for gate in self._gates:
            gate.remove()
        self._gates = []


def _is_on(slot: Slot, active: Active) -> bool:
    return slot.layer in active.layers if slot.layer is not None else active.extras


def describe_active(active: dict[str, Active]) -> str:
    return ", ".join(f"{modality}: {a.describe()}" for modality, a in active.items())


def scheduler_mode(args: Any) -> str:
    """`grad` when DDP runs without find_unused_parameters (its reducer would wait for frozen grads)."""
    distributed = getattr(args, "world_size", 1) > 1
    return "grad" if distributed and getattr(args, "ddp_find_unused_parameters", None) is False else "requires_grad"


def schedule_callback(session) -> Any:
    """A transformers `TrainerCallback` driving the session's schedule (imported lazily: core stays host-free)."""
    from transformers import TrainerCallback

    class MMTuningScheduleCallback(TrainerCallback):
        """Stage at step N from `state.global_step` alone; stage changes go to the trainer's log history."""

        def __init__(self):
            self.scheduler: Optional[LayerScheduler] = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            plan = session.require_plan()
            total = state.max_steps if state.max_steps and state.max_steps > 0 else None
            self.scheduler = LayerScheduler(model, plan, schedule_plan(plan), total, scheduler_mode(args))
            late = [s for s in self.scheduler.schedule.change_steps(total) if total and s >= total]
            if late:
                logger.warning("mmtuning schedule: stage changes at steps %s come after the last step (%s); "
                               "those layers never train in this run.", late, total)
            self._apply(state)

        def on_step_begin(self, args, state, control, **kwargs):
            self._apply(state)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.scheduler is not None:
                self.scheduler.drop_inactive_grads()

        def on_train_end(self, args, state, control, **kwargs):
            if self.scheduler is not None:
                self.scheduler.restore()

        def _apply(self, state) -> None:
            changed = self.scheduler.apply(state.global_step)
            if changed is None:
                return
            stage = {m: a.describe() for m, a in changed.items()}
            logged = [e["mmtuning_stage"] for e in state.log_history if "mmtuning_stage" in e]
            if not logged or logged[-1] != stage:  # a resumed run does not log its current stage twice
                state.log_history.append({"step": state.global_step, "mmtuning_stage": stage})
            logger.info("mmtuning stage at step %d: %s", state.global_step, describe_active(changed))

    return MMTuningScheduleCallback()
