"""After PEFT wraps the model: freeze the copy tensors a selective method does not train (PEFT makes a
modules_to_save copy trainable whole), and check that the trainable tensors of every selected module equal the
plan. Both run wherever a wrapped model meets the plan (`apply_plan`, `MMTuning.verify`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..names import module_of


def settle_selected(model: nn.Module, plan: Any) -> int:
    """Freeze the tensors of selected copies that the plan does not train; returns how many were frozen."""
    if not plan.selected:
        return 0
    frozen = 0
    for name, param in model.named_parameters():
        if plan.frozen_in_copy(name) and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def selective_problems(model: nn.Module, plan: Any, adapter_name: str = "default") -> list[str]:
    """How the wrapped model's selected modules differ from the plan (empty when they match): each planned tensor
    trains in its copy, nothing else of the copy trains, and the frozen original does not train."""
    if not plan.selected:
        return []
    wanted = {f"{s.name}.{local}": s for s in plan.selected for local in s.trained}
    trains, frozen_wrong, missing = set(), [], []
    marker = f".modules_to_save.{adapter_name}."
    names = {s.name for s in plan.selected}
    for name, param in model.named_parameters():
        prefix, local = name.rsplit(".", 1)
        owner = module_of(prefix)  # the copy (`.modules_to_save.default`) or the original (`.original_module`)
        if owner not in names:
            continue
        key = f"{owner}.{local}"
        if marker in name:
            if key in wanted and param.requires_grad:
                trains.add(key)
            elif key not in wanted and param.requires_grad:
                frozen_wrong.append(key)
        elif param.requires_grad:  # the original module (or an unwrapped one) trains
            frozen_wrong.append(f"{key} (the original, not the copy)")
    missing = sorted(set(wanted) - trains)
    problems = []
    if missing:
        problems.append(f"selected tensors that do not train: {_few(missing)}")
    if frozen_wrong:
        problems.append(f"tensors that train but the selective plan keeps frozen: {_few(sorted(frozen_wrong))}")
    return problems


def _few(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
