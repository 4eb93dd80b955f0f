"""`sculpt`: LoRASculpt (CVPR 2025) in weight space, no features needed.

Conflict-mitigation regularizer: M = tanh(w * |1 / log(|W / ||W||_2| + eps)|) on the frozen base weight W
(large entries of W get M near 1), loss = mean over the chosen LoRA layers of ||M * (B @ A * scaling)||_F:
updates are pushed away from the base weights that matter most. M depends only on frozen weights, so it is
computed once (4-bit bases are dequantized once) and stored in the base weight's 16-bit dtype. With LoRA B = 0 the loss is exactly 0 at the start.
Optional sparsification keeps the top `keep` share of magnitudes of every A and B from step
`sparsify_from` on (the mask is chosen once at that step and re-applied after each later step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from ..errors import MMTuningError
from ..names import modality_by_map, module_of
from ..quant.bnb import float_weight, original_dtype
from .base import AlignmentLoss, LossOptions
from .capture import FeatureCapture, StepFeatures

QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv")


class SculptOptions(LossOptions):
    weight: float = Field(default=1e-3, ge=0, description="lambda; LoRASculpt uses 1e-3.")
    w: float = Field(default=1.0, gt=0, description="Sharpness of the conflict mask (LoRASculpt: 1).")
    eps: float = Field(default=1e-8, gt=0)
    modules: list[str] = Field(default_factory=lambda: list(QKV_NAMES),
                               description="Leaf names of the LoRA layers regularized (besides the projector).")
    projector: bool = Field(default=True, description="Also regularize every LoRA layer in the projector.")
    sparsify_from: int | None = Field(default=None, ge=0, description="Optimizer step from which A and B are sparsified.")
    keep: float = Field(default=0.1, gt=0, le=1, description="Share of magnitudes kept in each A and B when sparsifying.")

    def acts_without_weight(self) -> bool:
        return self.sparsify_from is not None


def frozen_parameter(layer: nn.Module) -> torch.Tensor:
    """The base weight a LoRA layer adapts: the Linear's weight, or the bare parameter of a ParamWrapper
    (PEFT target_parameters, e.g. Gemma 3's projector weight)."""
    get_param = getattr(layer, "get_param", None)
    return get_param() if callable(get_param) else layer.get_base_layer().weight


def delta_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The LoRA update laid out like the base weight (with gradient to A and B)."""
    if callable(getattr(layer, "get_param", None)):
        return layer.get_delta_weight(adapter)
    return (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight) * layer.scaling[adapter]


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight of a LoRA layer as a float tensor (4-bit weights dequantized)."""
    return float_weight(frozen_parameter(layer))


def stored_dtype(layer: nn.Module) -> torch.dtype:
    """Masks are as big as the base weights: keep them in the base's 16-bit dtype (a 4-bit base's original
    dtype) rather than float32; a float32 base keeps float32 masks."""
    dtype = original_dtype(frozen_parameter(layer))
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def conflict_mask(weight: torch.Tensor, w: float, eps: float) -> torch.Tensor:
    """LoRASculpt's M = tanh(w * |1/log(|W/||W||_2| + eps)|), ||W||_2 the 2-norm of the flattened weight."""
    relative = (weight / weight.norm()).abs() + eps
    return torch.tanh(w * (1.0 / torch.log(relative)).abs())


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters and module.active_adapters[0] in module.lora_A:
            yield name, module


def top_magnitude_mask(weight: torch.Tensor, keep: float) -> torch.Tensor:
    count = max(1, math.ceil(keep * weight.numel()))
    threshold = weight.detach().abs().flatten().kthvalue(weight.numel() - count + 1).values
    return weight.detach().abs() >= threshold


@dataclass
class LayerGroup:
    """LoRA layers whose updates have one shape and rank: one batched B@A and one mask product per step
    instead of a handful of small ops per layer (the per-op overhead dominates on small models)."""

    indices: list[int]
    masks: torch.Tensor  # (G, out, in)
    scales: torch.Tensor | None  # (G, 1, 1); None for a single layer computed by PEFT (ParamWrapper)

    def norms(self, layers: list[tuple[str, nn.Module, str]]) -> torch.Tensor:
        if self.scales is None:
            _, layer, adapter = layers[self.indices[0]]
            delta = delta_weight(layer, adapter).unsqueeze(0)
        else:
            a = torch.stack([layers[i][1].lora_A[layers[i][2]].weight for i in self.indices])
            b = torch.stack([layers[i][1].lora_B[layers[i][2]].weight for i in self.indices])
            if self.scales.device != a.device:
                self.scales = self.scales.to(a.device)
            delta = torch.bmm(b, a) * self.scales.to(a.dtype)
        if self.masks.device != delta.device:
            self.masks = self.masks.to(delta.device)
        return torch.linalg.vector_norm((self.masks * delta).to(torch.float32), dim=(1, 2))


def group_layers(layers: list[tuple[str, nn.Module, str]], masks: list[torch.Tensor]) -> list[LayerGroup]:
    keyed: dict[tuple, list[int]] = {}
    for index, (_, layer, adapter) in enumerate(layers):
        if callable(getattr(layer, "get_param", None)):
            key: tuple = ("single", index)
        else:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            key = (tuple(b.shape), tuple(a.shape), a.dtype, masks[index].dtype)
        keyed.setdefault(key, []).append(index)
    groups = []
    for key, indices in keyed.items():
        scales = None if key[0] == "single" else torch.tensor(
            [float(layers[i][1].scaling[layers[i][2]]) for i in indices]).view(-1, 1, 1)
        groups.append(LayerGroup(indices, torch.stack([masks[i] for i in indices]), scales))
    return groups


class SculptLoss(AlignmentLoss):
    Options = SculptOptions

    def attach(self, model: nn.Module, capture: FeatureCapture) -> None:
        modality_map = capture.layout.modality_map
        self._layers: list[tuple[str, nn.Module, str]] = []
        masks = []
        for name, layer in lora_layers(model):
            plain = module_of(name)
            in_projector = self.options.projector and modality_by_map(plain, modality_map) == "projector"
            if not (in_projector or plain.rsplit(".", 1)[-1] in self.options.modules):
                continue
            adapter = layer.active_adapters[0]
            weight = base_weight(layer)
            with torch.no_grad():
                same_layout = weight.dim() == 2 and delta_weight(layer, adapter).shape == weight.shape
            if not same_layout:
                continue  # conv layers: the update is not a matrix laid out like W
            masks.append(conflict_mask(weight, self.options.w, self.options.eps).to(stored_dtype(layer)))
            self._layers.append((name, layer, adapter))
        if not self._layers:
            raise MMTuningError(
                f"mmtuning.losses.{self.name}: no LoRA layer matches modules {self.options.modules}"
                f"{' or the projector' if self.options.projector else ''}; LoRASculpt needs LoRA (method: lora) on "
                f"q/k/v or the projector. Set `modules:` to leaf names that have adapters, or remove the loss.")
        self._groups = group_layers(self._layers, masks)
        self._sparsity: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def _masks(self) -> list[torch.Tensor]:
        """The per-layer masks, in `_layers` order (views into the grouped stacks)."""
        by_index = {index: group.masks[position] for group in self._groups
                    for position, index in enumerate(group.indices)}
        return [by_index[index] for index in range(len(self._layers))]

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _, _ in self._layers]

    def forward(self, features: StepFeatures | None = None) -> torch.Tensor:
        norms = [group.norms(self._layers) for group in self._groups]
        return torch.cat(norms).mean()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        start = self.options.sparsify_from
        if start is None or step < start:
            return
        with torch.no_grad():
            if self._sparsity is None:
                self._sparsity = [(top_magnitude_mask(layer.lora_A[adapter].weight, self.options.keep),
                                   top_magnitude_mask(layer.lora_B[adapter].weight, self.options.keep))
                                  for _, layer, adapter in self._layers]
            for (_, layer, adapter), (keep_a, keep_b) in zip(self._layers, self._sparsity):
                layer.lora_A[adapter].weight.mul_(keep_a)
                layer.lora_B[adapter].weight.mul_(keep_b)
