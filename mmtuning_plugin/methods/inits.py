"""Calibrated LoRA starts (`init: pissa | milora | olora | corda`), per modality, without touching the base weights.

PiSSA, MiLoRA, OLoRA and CorDA start LoRA's factors from a decomposition of the base weight W and subtract that start from
W, so the model starts equal to the base. Rewriting W would make the adapter-off model a different model (keep,
the anchor loss and `mmtune eval` compare with the adapter-off model) and a 4-bit W would have to be re-quantized.
Here W stays as it is: each calibrated module's LoRA gets rank 2r with factors

    A = [A0; A0],   B = [B0, -B0],   scale * B A = scale * (B0 A0 - B0 A0) = 0 at the start,

the first half trainable, the second half frozen (its gradient is masked, and it is put back after every optimizer
step, in case weight decay moved it). The trained adapter is a plain rank-2r LoRA whose delta is
`scale * (B1 A1 - B0 A0)`, exactly what the rewritten-base methods learn, and it loads, merges and exports on the
original base like any LoRA. The cost is a second r of frozen factors in each calibrated module.

CorDA also reads data: each module's input covariance C on the first training batches, and decomposes W C instead
of W, so the start holds the directions the task's inputs excite most (its instruction-previewed mode).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..config import INITS_FROM_DATA
from ..errors import MMTuningError

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


DAMPING = 1e-4  # CorDA's covariance damping, relative to its mean diagonal


def correlated(weight: torch.Tensor, r: int, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA (instruction-previewed): SVD of W C = U S Vh, so W = U S (Vh C^-1); the r largest triplets, as
    A0 = sqrt(S) Vh C^-1, B0 = U sqrt(S). C is damped (a small share of its mean diagonal) so it inverts even
    when the batches span fewer directions than the module's inputs."""
    cov = covariance.double()
    cov = cov + torch.eye(len(cov), dtype=cov.dtype, device=cov.device) * (DAMPING * cov.diagonal().mean() + 1e-12)
    u, s, vh = torch.linalg.svd(weight.double() @ cov, full_matrices=False)
    root = s[:r].sqrt()
    a0 = torch.linalg.solve(cov, vh[:r].T).T  # Vh_r C^-1 (C is symmetric)
    return (root[:, None] * a0).float(), (u[:, :r] * root[None, :]).float()


STARTS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "pissa": principal, "milora": minor, "olora": orthonormal, "corda": correlated,
}


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's base weight in float32, dequantized when bitsandbytes holds it in 4 or 8 bits."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    weight = base.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):  # packed, whatever the storage dtype says
        weight = dequantize_module_weight(base)
    return weight.detach().float()


def calibrate(layer: nn.Module, adapter: str, init: str, r: int, covariance: torch.Tensor | None = None) -> None:
    """Fill a rank-2r LoRA layer with [A0; A0], [B0, -B0] for `init` and freeze the second halves."""
    extra = () if covariance is None else (covariance.to(base_weight(layer).device),)
    a0, b0 = STARTS[init](base_weight(layer), r, *extra)
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


def check_init_data(plan: Any, batches: Any) -> None:
    """Before wrapping (nothing changed yet): an init that reads data needs the training batches."""
    needing = sorted({plan.config.init_of(m.modality) for m in plan.modules} & set(INITS_FROM_DATA))
    if needing and batches is None:
        raise MMTuningError(
            f"init: {needing[0]} builds each module's start from its inputs on the first training batches, and none "
            f"were given here. Give the data: pass the unwrapped model to MMTuningTrainer with its train_dataset (it "
            f"reads the first batches), call MMTuning.wrap(model, probe_batches=...), or train through "
            f"LLaMA-Factory (stage: sft); or use a start that needs no data (init: pissa, milora or olora).")


def apply_inits(model: nn.Module, plan: Any, adapter: str = "default", batches: Any = None) -> int:
    """Calibrate every planned module whose modality asks for a calibrated init (`batches`: the training batches
    the data-reading inits need); returns how many."""
    from ..names import PEFT_PREFIX

    calibrated = {planned.name: (planned, model.get_submodule(PEFT_PREFIX + planned.name))
                  for planned in plan.modules if plan.config.init_of(planned.modality) != "lora"}
    reading = {name: layer for name, (planned, layer) in calibrated.items()
               if plan.config.init_of(planned.modality) in INITS_FROM_DATA}
    covariances = input_covariances(model, reading, batches, plan.config.init_batches) if reading else {}
    for name, (planned, layer) in calibrated.items():
        calibrate(layer, adapter, plan.config.init_of(planned.modality), planned.r, covariances.get(name))
    return len(calibrated)


def input_covariances(model: nn.Module, layers: dict[str, nn.Module], batches: Any, limit: int) -> dict[str, torch.Tensor]:
    """Each layer's mean input outer product E[x x^T] over every token of the first `limit` batches (eval mode, no
    grad; summed over the ranks of a distributed run so that every rank starts the same)."""
    import itertools

    from ..base_view import cpu_4bit_repack_off, to_model

    sums: dict[str, list] = {name: [None, 0] for name in layers}

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            total = sums[name]
            total[0] = x.T @ x if total[0] is None else total[0] + x.T @ x
            total[1] += x.shape[0]
        return hook

    handles = [layer.get_base_layer().register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), cpu_4bit_repack_off(model):
            for batch in itertools.islice(iter(batches), limit):
                batch = {k: v for k, v in dict(batch).items() if k != "labels"}
                model(**to_model(batch, model))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {name: total[0] / total[1] for name, total in summed_over_ranks(sums).items()}


def summed_over_ranks(sums: dict[str, list]) -> dict[str, list]:
    """The sums of every rank (each read its own batches), after refusing a layer no batch reached."""
    import torch.distributed as dist

    for name, total in sums.items():
        if total[0] is None:
            raise MMTuningError(f"init: corda: {name} got no input from the calibration batches (do they carry what "
                                f"this module reads, e.g. pixel_values for the vision tower?); give training batches "
                                f"as the trainer collates them, or use init: pissa, milora or olora for its modality.")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for total in sums.values():
            count = torch.tensor([float(total[1])], dtype=torch.float64, device=total[0].device)
            dist.all_reduce(total[0])
            dist.all_reduce(count)
            total[1] = float(count)
    return sums


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
