"""`multiscale`: the contrastive or anchor loss at several chosen layers, averaged.

- `of: contrastive`, `layers` index language layers: at each, the hidden states at image-token positions
  (pooled) are contrasted with those at answer positions of the same layer.
- `of: anchor`, `layers` index vision layers: each layer's output is held close to what the same layer
  gives with its adapters off, re-running that layer alone on its captured input.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import MMTuningError
from .anchor import AnchorLoss, AnchorOptions
from .base import AlignmentLoss, LossOptions
from .capture import FeatureCapture, StepFeatures
from .contrastive import ContrastiveLoss, ContrastiveOptions


class MultiscaleOptions(LossOptions):
    of: Literal["contrastive", "anchor"] = Field(default="anchor", description="Which loss to apply per layer.")
    layers: list[int] = Field(min_length=1, description="Layer indices (vision layers for anchor, language layers for "
                                                        "contrastive); negative counts from the end.")
    metric: Literal["cosine", "mse"] = "cosine"
    temperature: float = Field(default=0.07, gt=0)
    learnable_temperature: bool = True


class _LayerAnchor(AnchorLoss):
    def __init__(self, name: str, options: AnchorOptions, layers: list[int]):
        super().__init__(name, options)
        self._layer_indices = layers

    def points(self, capture: FeatureCapture) -> list[tuple[str, nn.Module]]:
        return [(capture.vision_layer(i), capture.layer_module("vision", i)) for i in self._layer_indices]


class _LayerContrastive(ContrastiveLoss):
    def __init__(self, name: str, options: ContrastiveOptions, layers: list[int]):
        super().__init__(name, options)
        self._layer_indices = layers

    def attach(self, model: nn.Module, capture: FeatureCapture) -> None:
        self._keys = [capture.language_layer(i) for i in self._layer_indices]

    def forward(self, features: StepFeatures) -> torch.Tensor | None:
        terms = []
        for key in self._keys:
            states = features.output(key)
            term = self.pair_loss(states, states, features)
            if term is None:
                return None
            terms.append(term)
        return torch.stack(terms).mean()


class MultiscaleLoss(AlignmentLoss):
    Options = MultiscaleOptions

    def __init__(self, name: str, options: MultiscaleOptions):
        super().__init__(name, options)
        common = dict(weight=options.weight, warmup_steps=options.warmup_steps)
        if options.of == "anchor":
            self.inner = _LayerAnchor(name, AnchorOptions(metric=options.metric, **common), options.layers)
        else:
            self.inner = _LayerContrastive(name, ContrastiveOptions(
                temperature=options.temperature, learnable_temperature=options.learnable_temperature, **common),
                options.layers)
        self.needs_image_tokens = options.of == "contrastive"

    def attach(self, model: nn.Module, capture: FeatureCapture) -> None:
        modality = "vision" if self.options.of == "anchor" else "language"
        numbers = [capture.layer_index(modality, i) for i in self.options.layers]
        if len(set(numbers)) != len(numbers):
            raise MMTuningError(f"mmtuning.losses.{self.name}.layers: {self.options.layers} repeats a layer; list each once.")
        self.inner.attach(model, capture)

    def forward(self, features: StepFeatures) -> torch.Tensor | None:
        return self.inner(features)
