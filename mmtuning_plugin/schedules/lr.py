"""Per-modality learning rates: optimizer parameter groups at lr x the modality's `lr`, with layer-wise decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import MODALITIES

from .plan import parameter_slots, targeted_layers


def optimizer_groups(model: nn.Module, plan, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Groups per modality (`vision`, `projector`, `language`, `other`) at lr x the modality's `lr`;
    with `lr_decay`, one group per layer (`vision.layer3`) at lr x mult x decay^(depth below the top
    targeted layer). Adapters of not-yet-active stages are included: the optimizer is built once."""
    groups: dict[str, dict[str, Any]] = {}
    params = dict(model.named_parameters())
    top = {m: max(targeted_layers(plan, m), default=0) for m in ("vision", "language")}
    for name, slot in parameter_slots(model, plan).items():
        key, rate = slot.modality, lr
        if slot.modality in MODALITIES:
            spec = plan.config.spec(slot.modality)
            rate = lr * spec.lr
            if spec.lr_decay is not None and slot.layer is not None:
                key, rate = f"{slot.modality}.layer{slot.layer}", rate * spec.lr_decay ** (top[slot.modality] - slot.layer)
        group = groups.setdefault(key, {"params": [], "lr": rate, "weight_decay": weight_decay, "name": key})
        group["params"].append(params[name])
    return list(groups.values())
