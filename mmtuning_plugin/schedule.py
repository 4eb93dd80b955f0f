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
from typing import Any, Callable, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from .config import LayerSelection
from .errors import MMTuningError
from .names import is_adapter_parameter, module_of, modality_of_parameter

logger = logging.getLogger("mmtuning.schedule")

At = Union[int, float]  # an int is an optimizer step; a float in [0, 1] is a fraction of training


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


def _check_at(value: At, where: str = "") -> At:
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool):
        raise ValueError(f"{prefix}write a step number or a fraction of training, not {value!r}")
    if isinstance(value, float) and not 0 <= value <= 1:
        raise ValueError(f"{prefix}{value!r} is neither a step number (write an integer) nor a fraction in [0, 1]")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{prefix}step {value} is negative")
    return value


@dataclass(frozen=True)
class Stage:
    """From optimizer step `at` on (step or fraction), exactly these layers train; `extras`: the
    modality's parameters outside numbered layers (projector, patch_embed, embed_tokens, lm_head)."""

    at: At
    layers: tuple[int, ...]
    extras: bool


# --- spec models (what the YAML `schedule:` key holds) ----------------------------------------------


class StaticSchedule(BaseModel):
    """Every targeted layer trains from step 0 (the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["static"] = "static"

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        return [Stage(0, tuple(targeted), True)]


class TopDownSchedule(BaseModel):
    """Start with the top `start` targeted layers; add `step_layers` more (downward) every `every`
    steps (int) or fraction of training (float), until every targeted layer trains. Without `every`,
    the stages are spread evenly so that all layers train from half-way through training."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["top_down"] = "top_down"
    start: int = Field(default=1, ge=1, description="Targeted layers (counted from the top) that train from step 0.")
    step_layers: int = Field(default=1, ge=1, description="Layers added at each stage change.")
    every: Optional[At] = Field(default=None, description="Steps (int >= 1) or fraction of training (float) between stages.")

    @field_validator("every")
    @classmethod
    def _every(cls, value):
        if value is None:
            return value
        _check_at(value)
        if value == 0:
            raise ValueError("every: 0 would add every layer at once; write a step count >= 1 or a fraction > 0")
        return value

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        count = len(targeted)
        if self.start >= count:
            raise MMTuningError(f"{where}: top_down start: {self.start} already covers all {count} targeted layers "
                                f"({_span(targeted)}), so nothing would be added later; write start: {max(1, count - 1)} "
                                f"or less, or use schedule: static.")
        changes = math.ceil((count - self.start) / self.step_layers)
        every: At = self.every if self.every is not None else 0.5 / changes
        stages = []
        for index in range(changes + 1):
            on = min(count, self.start + index * self.step_layers)
            at: At = index * every if index else 0
            if isinstance(at, float) and at > 1:
                raise MMTuningError(f"{where}: top_down every: {every:g} puts stage {index} at {at * 100:g}% of "
                                    f"training, past the end; lower `every` or raise `step_layers`.")
            stages.append(Stage(at, tuple(targeted[count - on:]), True))
        return stages


class CustomStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    at: At = Field(description="Optimizer step (int) or fraction of training (float) where this stage starts.")
    layers: LayerSelection = Field(description="Layers that train from `at` on (same forms as `layers:`).")

    @field_validator("at")
    @classmethod
    def _at(cls, value):
        return _check_at(value)


class CustomSchedule(BaseModel):
    """An explicit list of stages `{at: step-or-fraction, layers: ...}`; before the first stage, no layer trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["custom"] = "custom"
    stages_: tuple[CustomStage, ...] = Field(alias="stages", min_length=1)

    @model_validator(mode="after")
    def _ordered(self):
        for kind in (int, float):
            ats = [s.at for s in self.stages_ if isinstance(s.at, kind) and not isinstance(s.at, bool)]
            if ats != sorted(ats) or len(set(ats)) != len(ats):
                raise ValueError(f"stages: `at` values {ats} must strictly increase")
        return self

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        out = [] if self.stages_[0].at == 0 else [Stage(0, (), False)]
        for index, stage in enumerate(self.stages_):
            layers = stage.layers.resolve(num_layers, f"{where}.stages[{index}].layers")
            outside = sorted(set(layers) - set(targeted))
            if outside:
                raise MMTuningError(f"{where}.stages[{index}].layers: layers {outside} get no adapters (targeted: "
                                    f"{_span(targeted)}); a schedule can only turn targeted layers on. Widen `layers:` "
                                    f"or drop them from the stage.")
            out.append(Stage(stage.at, tuple(layers), bool(layers)))
        return out


class ProjectorSchedule(BaseModel):
    """The projector trains `always`, `{from: N}` (from step or fraction N on), `{until: N}`, or both."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    type: Literal["projector"] = "projector"
    start: Optional[At] = Field(default=None, alias="from")
    until: Optional[At] = None

    @model_validator(mode="before")
    @classmethod
    def _always(cls, value):
        return {} if value in ("always", "static", None) else value

    @model_validator(mode="after")
    def _check(self):
        for name, value in (("from", self.start), ("until", self.until)):
            if value is not None:
                _check_at(value, name)
        if self.start is not None and self.until is not None and type(self.start) is type(self.until) \
                and self.until <= self.start:
            raise ValueError(f"until: {self.until} is not after from: {self.start}")
        return self

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        out = [Stage(0, (), self.start in (None, 0))]
        if self.start not in (None, 0):
            out.append(Stage(self.start, (), True))
        if self.until is not None:
            out.append(Stage(self.until, (), False))
        return out


BUILTIN_SCHEDULES: dict[str, Callable[[dict], Any]] = {
    "static": StaticSchedule.model_validate,
    "top_down": TopDownSchedule.model_validate,
    "custom": CustomSchedule.model_validate,
}


def registered_schedules() -> dict[str, Callable[[dict], Any]]:
    """Schedule type name -> factory(options dict) (built-ins and plugins, via `register_schedules`)."""
    from .plugins import collect

    return dict(collect("register_schedules", lambda name, factory: (name, factory)))


def parse_schedule(value: Any, modality: str, where: str | None = None) -> Any:
    """The `schedule:` value of one modality as a schedule object (with a `stages(...)` method)."""
    where = where or f"mmtuning.{modality}.schedule"
    if hasattr(value, "stages") and callable(getattr(value, "stages")):
        return value
    if modality == "projector":
        try:
            return ProjectorSchedule.model_validate(value)
        except ValidationError as error:
            raise MMTuningError(_errors_text(error, where) + " (the projector takes `always`, `{from: N}`, `{until: N}`; "
                                "N a step or a fraction of training)") from None
    if value is None:
        value = "static"
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise MMTuningError(f"{where}: write `static`, `top_down`, or a mapping with `type:` (e.g. "
                            f"{{type: top_down, start: 2, every: 100}}), not {value!r}.")
    kind = value.get("type", "static")
    factories = registered_schedules()
    if kind not in factories:
        raise MMTuningError(f"{where}.type: unknown schedule {kind!r}; known: {', '.join(sorted(factories))}.")
    try:
        return factories[kind](dict(value))
    except ValidationError as error:
        raise MMTuningError(_errors_text(error, where)) from None


def _errors_text(error: ValidationError, where: str) -> str:
    """pydantic errors of a schedule as `schedule.every: <why>` lines (the YAML key under the modality)."""
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in (where, *item["loc"]) if not (isinstance(p, str) and "[" in p))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{path}: {message}")
    return "; ".join(dict.fromkeys(lines))


def _span(layers: Iterable[int]) -> str:
    layers = list(layers)
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


# --- resolved schedule of one run --------------------------------------------------------------------


@dataclass(frozen=True)
class Active:
    """What trains in one modality at one step."""

    layers: tuple[int, ...]
    extras: bool

    def describe(self) -> str:
        if not self.layers:
            return "on" if self.extras else "off"
        return _span(self.layers)


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
        if not isinstance(schedule, (StaticSchedule, ProjectorSchedule)) and not targeted:
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
