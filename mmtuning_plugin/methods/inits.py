"""Calibrated LoRA starts (`init: pissa | milora | olora`), per modality, without touching the base weights.

PiSSA, MiLoRA and OLoRA start LoRA's factors from a decomposition of the base weight W and subtract that start from
W, so the model starts equal to the base. Rewriting W would make the adapter-off model a different model (keep,
the anchor loss and `mmtune eval` compare with the adapter-off model) and a 4-bit W would have to be re-quantized.
Here W stays as it is: each calibrated module's LoRA gets rank 2r with factors

    A = [A0; A0],   B = [B0, -B0],   scale * B A = scale * (B0 A0 - B0 A0) = 0 at the start,

the first half trainable, the second half frozen (its gradient is masked, and it is put back after every optimizer
step, in case weight decay moved it). The trained adapter is a plain rank-2r LoRA whose delta is
`scale * (B1 A1 - B0 A0)`, exactly what the rewritten-base methods learn, and it loads, merges and exports on the
original base like any LoRA. The cost is a second r of frozen factors in each calibrated module.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

FROZEN = "_mmtuning_frozen_half"  # layer attribute: (A0, -B0), the halves put back after each step


def principal(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: the r largest singular triplets, as A0 = sqrt(S) Vh, B0 = U sqrt(S) (full SVD, as PEFT's `pissa`)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def minor(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA: the r smallest singular triplets (full SVD), in the same form."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[-r:].sqrt()
    return root[:, None] * vh[-r:], u[:, -r:] * root[None, :]


def orthonormal(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: the first r columns of Q and rows of R of W = QR."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r], q[:, :r]


STARTS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "pissa": principal, "milora": minor, "olora": orthonormal,
}


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's base weight in float32, dequantized when bitsandbytes holds it in 4 or 8 bits."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    weight = base.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):  # packed, whatever the storage dtype says
        weight = dequantize_module_weight(base)
    return weight.detach().float()


def calibrate(layer: nn.Module, adapter: str, init: str, r: int) -> None:
    """Fill a rank-2r LoRA layer with [A0; A0], [B0, -B0] for `init` and freeze the second halves."""
    a0, b0 = STARTS[init](base_weight(layer), r)
    a0, b0 = a0 / math.sqrt(layer.scaling[adapter]), b0 / math.sqrt(layer.scaling[adapter])  # scale * B0 A0 = part of W
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        lora_a.copy_(torch.cat([a0, a0]).to(lora_a.dtype))
        lora_b.copy_(torch.cat([b0, -b0], dim=1).to(lora_b.dtype))
    frozen_a, frozen_b = torch.zeros_like(lora_a, dtype=torch.bool), torch.zeros_like(lora_b, dtype=torch.bool)
    frozen_a[r:], frozen_b[:, r:] = True, True
    lora_a.register_hook(lambda grad: grad.masked_fill(frozen_a, 0))
    lora_b.register_hook(lambda grad: grad.masked_fill(frozen_b, 0))
    setattr(layer, FROZEN, (adapter, r, lora_a.detach()[r:].clone(), lora_b.detach()[:, r:].clone()))


def apply_inits(model: nn.Module, plan: Any, adapter: str = "default") -> int:
    """Calibrate every planned module whose modality asks for a calibrated init; returns how many."""
    from ..names import PEFT_PREFIX

    count = 0
    for planned in plan.modules:
        init = plan.config.init_of(planned.modality)
        if init != "lora":
            calibrate(model.get_submodule(PEFT_PREFIX + planned.name), adapter, init, planned.r)
            count += 1
    return count


def frozen_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for layer in model.modules() if getattr(layer, FROZEN, None) is not None]


def restore_frozen_halves(layers: list[nn.Module]) -> None:
    """Put the frozen halves back (an optimizer's weight decay moves even a parameter whose gradient is zero)."""
    with torch.no_grad():
        for layer in layers:
            adapter, r, a0, minus_b0 = getattr(layer, FROZEN)
            layer.lora_A[adapter].weight[r:].copy_(a0)
            layer.lora_B[adapter].weight[:, r:].copy_(minus_b0)


def init_callback(session: Any) -> Any:
    """A transformers TrainerCallback restoring the frozen halves after each optimizer step. The layers are found
    once per model, so a run without calibrated inits pays one walk over its modules, not one per step."""
    from transformers import TrainerCallback

    class FrozenHalves(TrainerCallback):
        found: tuple[int, list[nn.Module]] | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            if self.found is None or self.found[0] != id(model):
                self.found = (id(model), frozen_layers(model))
            restore_frozen_halves(self.found[1])

    return FrozenHalves()


def size(init: str, r: int) -> int:
    """The rank PEFT holds for a module: 2r with a calibrated start (the frozen half), else r."""
    return r if init == "lora" else 2 * r
