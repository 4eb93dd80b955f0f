"""`anchor`: keep a module's output close to what the same module gives with adapters off.

By default the module is the projector: its input is captured in the host's forward and the projector
alone is re-run under no_grad with its adapters disabled, so the frozen reference costs one projector
call, not a second model forward. With LoRA B initialised to zero the loss is exactly 0 at the start.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..base_view import adapters_disabled, has_adapters
from ..errors import MMTuningError
from .base import AlignmentLoss, LossOptions
from .capture import FeatureCapture, Record, StepFeatures, first_tensor, require_graph


class AnchorOptions(LossOptions):
    metric: Literal["cosine", "mse"] = Field(default="cosine", description="1 - cosine similarity per token, or MSE.")


def distance(current: torch.Tensor, frozen: torch.Tensor, metric: str) -> torch.Tensor:
    current, frozen = current.to(torch.float32), frozen.to(torch.float32)
    if metric == "mse":
        return F.mse_loss(current, frozen)
    return (1.0 - F.cosine_similarity(current, frozen, dim=-1, eps=1e-6)).mean()


class AnchorLoss(AlignmentLoss):
    Options = AnchorOptions

    def points(self, capture: FeatureCapture) -> list[tuple[str, nn.Module]]:
        """The hooked modules this anchor holds in place (key, module)."""
        key = capture.projector()
        return [(key, capture.model.get_submodule(capture.layout.modality_map.projector[0]))]

    def attach(self, model: nn.Module, capture: FeatureCapture) -> None:
        self._capture = capture
        self._points = self.points(capture)
        bare = [key for key, module in self._points if not has_adapters(module)]
        if bare:
            raise MMTuningError(
                f"mmtuning.losses.{self.name}: {', '.join(bare)} has no adapters, so its output cannot drift and "
                f"the anchor would be a no-op; enable adapters there (projector: {{...}}) or remove the loss.")

    def forward(self, features: StepFeatures) -> torch.Tensor:
        terms = [self._one(key, record, module) for key, module in self._points for record in features.get(key)]
        return torch.stack(terms).mean()

    def _one(self, key: str, record: Record, module: nn.Module) -> torch.Tensor:
        current = first_tensor(record.output)
        if key in self._capture.trainable_points:
            require_graph(current, key)
        self._capture.paused = True
        try:
            with torch.no_grad(), adapters_disabled(module):
                frozen = first_tensor(module(*record.args, **record.kwargs))
        finally:
            self._capture.paused = False
        return distance(current, frozen, self.options.metric)
