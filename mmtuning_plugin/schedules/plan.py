"""The pure plan of a run's schedules: which layers of each modality train at optimizer step N, a function
of N and the total step count alone, and which stage slot (modality, layer) each parameter belongs to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..config import MODALITIES, At, Stage, layer_span, parse_schedule
from ..errors import MMTuningError
from ..names import is_adapter_parameter, modality_of_parameter, module_of


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
    """Layers with adapters or selectively trained modules in `modality`."""
    layers = [m.leaf.layer for m in plan.modules_of(modality)] + [s.layer for s in plan.selected_of(modality)]
    return sorted({layer for layer in layers if layer is not None})


def schedule_plan(plan) -> SchedulePlan:
    """Resolve each enabled modality's `schedule:` against the target plan (targeted layers per modality)."""
    stages, has_layers = {}, {}
    for modality in MODALITIES:
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


@dataclass(frozen=True)
class Slot:
    modality: str
    layer: Optional[int]


def parameter_slots(model: nn.Module, plan) -> dict[str, Slot]:
    """Every trainable (or adapter) parameter -> its modality and layer (None outside numbered layers)."""
    layer_of = {m.name: m.leaf.layer for m in plan.modules} | {s.name: s.layer for s in plan.selected}
    slots = {}
    for name, param in model.named_parameters():
        if not (param.requires_grad or is_adapter_parameter(name)) or plan.frozen_in_copy(name):
            continue
        modality = modality_of_parameter(plan, name) or "other"
        slots[name] = Slot(modality, layer_of.get(module_of(name)))
    return slots
