"""Progressive-layer schedules and per-modality learning rates.

A schedule says which targeted layers of a modality train at optimizer step N. It is a list of stages
(`at` a step or a fraction of training, `layers` on from then), so the active set at step N is a pure
function of N and the total step count: a run resumed mid-schedule equals one never interrupted.

Mechanics (docs/schedules.md): every adapter parameter is in the optimizer from step 0, in its
modality's group. A parameter of an inactive stage gets `requires_grad=False` (no backward below the
lowest active layer, no gradient memory) and, before every optimizer step, `grad=None`; PyTorch
optimizers skip parameters whose grad is None, so an inactive adapter sees no update, no weight
decay and no moment drift. Under DDP without `find_unused_parameters` the scheduler only drops grads
(`mode="grad"`), because the reducer expects a gradient for every parameter it registered.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from torch import nn

from .config import At, Stage, layer_span, parse_schedule
from .errors import MMTuningError
from .names import is_adapter_parameter, module_of, modality_of_parameter

logger = logging.getLogger("mmtuning.schedule")


def resolve_at(at: At, total_steps: Optional[int]) -> int:
    """The optimizer step where a stage starts: an int as written, a fraction times the total steps."""
    if isinstance(at, bool):
        raise MMTuningError(f"schedule step {at!r} is not a number")
    if isinstance(at, int):
        return at
    if total_steps is None or total_steps <= 0:
        raise MMTuningError(f"schedule stage at fraction {at:g} needs the total number of training steps; "
                            f"set max_steps or write the stage as a step number.")
    return int(math.floor(at * total_steps))


def describe_at(at: At) -> str:
    return f"step {at}" if isinstance(at, int) else f"{at * 100:g}%"


# --- resolved schedule of one run --------------------------------------------------------------------


@dataclass(frozen=True)
class Active:
    """What trains in one modality at one step."""

    layers: tuple[int, ...]
    extras: bool

    def describe(self) -> str:
        if not self.layers:
            return "on" if self.extras else "off"
        return layer_span(self.layers)


@dataclass
class SchedulePlan:
    """Per modality, its stages with concrete layer indices: `active(step, total_steps)` is pure."""

    stages: dict[str, list[Stage]]
    has_layers: dict[str, bool] = field(default_factory=dict)

    def active(self, step: int, total_steps: Optional[int]) -> dict[str, Active]:
        return {modality: active_of(stages, step, total_steps) for modality, stages in self.stages.items()}

    def is_static(self) -> bool:
        return all(len(stages) == 1 and stages[0].extras for stages in self.stages.values())

    def change_steps(self, total_steps: Optional[int]) -> list[int]:
        """Steps where some modality's active set may change (0 first)."""
        steps = {0}
        for stages in self.stages.values():
            steps.update(resolve_at(s.at, total_steps) for s in stages)
        return sorted(steps)

    def has_fractions(self) -> bool:
        return any(isinstance(s.at, float) for stages in self.stages.values() for s in stages)

    def timeline(self, total_steps: Optional[int] = None) -> list[dict[str, Any]]:
        """Rows `{step, <modality>: "2-3" | "on" | "off"}`, one per step where the active set changes
        (needs total_steps when a stage is written as a fraction)."""
        rows, last = [], None
        for step in self.change_steps(total_steps):
            if total_steps and step >= total_steps:
                continue
            active = {m: a.describe() for m, a in self.active(step, total_steps).items()}
            if active != last:
                rows.append({"step": step, **active})
                last = active
        return rows

    def stage_list(self) -> dict[str, list[dict[str, str]]]:
        """Each modality's stages as written (`at: 50%`), for reports without a step count."""
        return {m: [{"at": describe_at(s.at), "layers": Active(s.layers, s.extras).describe()} for s in stages]
                for m, stages in self.stages.items()}

    def report(self, total_steps: Optional[int] = None) -> dict[str, Any]:
        """JSON for `inspect-targets`: the stages, and the timeline when the step of every stage is known."""
        known = total_steps is not None or not self.has_fractions()
        return {"static": self.is_static(), "total_steps": total_steps, "stages": self.stage_list(),
                "timeline": self.timeline(total_steps) if known else None}


def active_of(stages: list[Stage], step: int, total_steps: Optional[int]) -> Active:
    """The last stage whose start is at or before `step` (stages resolving to one step: the later wins)."""
    current = Active((), False)
    best = -1
    for stage in stages:
        start = resolve_at(stage.at, total_steps)
        if start <= step and start >= best:
            current, best = Active(stage.layers, stage.extras), start
    return current


def targeted_layers(plan, modality: str) -> list[int]:
    return sorted({m.leaf.layer for m in plan.modules_of(modality) if m.leaf.layer is not None})


def schedule_plan(plan) -> SchedulePlan:
    """Resolve each enabled modality's `schedule:` against the target plan (targeted layers per modality)."""
    stages, has_layers = {}, {}
    for modality in ("vision", "projector", "language"):
        spec = plan.config.spec(modality)
        if not spec.enabled:
            continue
        targeted = targeted_layers(plan, modality)
        schedule = parse_schedule(spec.schedule, modality)
        where = f"mmtuning.{modality}.schedule"
        if schedule.needs_layers and not targeted:
            raise MMTuningError(f"{where}: a layer schedule needs numbered layers with adapters, but {modality} has "
                                f"none targeted; remove `schedule:` or target some layers.")
        stages[modality] = list(schedule.stages(targeted, plan.layout.layer_counts.get(modality, 0), where))
        has_layers[modality] = bool(targeted)
    return SchedulePlan(stages, has_layers)


# --- which parameter belongs to which stage ---------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    modality: str
    layer: Optional[int]


def parameter_slots(model: nn.Module, plan) -> dict[str, Slot]:
    """Every trainable (or adapter) parameter -> its modality and layer (None outside numbered layers)."""
    layer_of = {m.name: m.leaf.layer for m in plan.modules}
    slots = {}
    for name, param in model.named_parameters():
        if not (param.requires_grad or is_adapter_parameter(name)):
            continue
        modality = modality_of_parameter(plan, name) or "other"
        slots[name] = Slot(modality, layer_of.get(module_of(name)))
    return slots


def optimizer_groups(model: nn.Module, plan, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Groups per modality (`vision`, `projector`, `language`, `other`) at lr x the modality's `lr`;
    with `lr_decay`, one group per layer (`vision.layer3`) at lr x mult x decay^(depth below the top
    targeted layer). Adapters of not-yet-active stages are included: the optimizer is built once."""
    groups: dict[str, dict[str, Any]] = {}
    params = dict(model.named_parameters())
    top = {m: max(targeted_layers(plan, m), default=0) for m in ("vision", "language")}
    for name, slot in parameter_slots(model, plan).items():
        key, rate = slot.modality, lr
        if slot.modality in ("vision", "projector", "language"):
            spec = plan.config.spec(slot.modality)
            rate = lr * spec.lr
            if spec.lr_decay is not None and slot.layer is not None:
                key, rate = f"{slot.modality}.layer{slot.layer}", rate * spec.lr_decay ** (top[slot.modality] - slot.layer)
        group = groups.setdefault(key, {"params": [], "lr": rate, "weight_decay": weight_decay, "name": key})
        group["params"].append(params[name])
    return list(groups.values())


class LayerScheduler:
    """Applies a `SchedulePlan` to a model, host-free: `apply(step)` before the forward of an update,
    `drop_inactive_grads()` before the optimizer step. `mode="requires_grad"` also skips the backward of
    inactive stages; `mode="grad"` only drops their grads (for DDP without find_unused_parameters)."""

    def __init__(self, model: nn.Module, plan, schedule: SchedulePlan, total_steps: Optional[int],
                 mode: Literal["requires_grad", "grad"] = "requires_grad"):
        self.schedule, self.total_steps, self.mode = schedule, total_steps, mode
        slots = parameter_slots(model, plan)
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in slots}
        self.slots = {name: slot for name, slot in slots.items() if slot.modality in schedule.stages}
        self.current: Optional[dict[str, Active]] = None
        self.inactive: list[nn.Parameter] = []
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
        if self.mode == "requires_grad":
            for name, param in self.params.items():
                param.requires_grad_(name in on)
        self.current = active
        return active

    def drop_inactive_grads(self) -> None:
        for param in self.inactive:
            param.grad = None

    def restore(self) -> None:
        """Everything trainable again (after training: saving, merging and evaluation see a normal model)."""
        for param in self.params.values():
            param.requires_grad_(True)


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
