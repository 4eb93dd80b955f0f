"""What every alignment loss is: options (pydantic), the features it asks for, and a forward that returns
one unweighted scalar. The suite applies weight and warm-up, so a loss stays a few lines of math."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import LossOptions

if TYPE_CHECKING:
    from .capture import FeatureCapture, StepFeatures


class AlignmentLoss(nn.Module):
    """Base class of a registered loss. An nn.Module so learnable pieces (a temperature) train and move
    with the model: the suite attaches every loss under the model's `mmtuning_losses` child."""

    Options: ClassVar[type[LossOptions]] = LossOptions
    # Needs image tokens inside the language sequence (not true of cross-attention models such as mllama).
    needs_image_tokens: ClassVar[bool] = False

    def __init__(self, name: str, options: LossOptions):
        super().__init__()
        self.name = name
        self.options = options

    def attach(self, model: nn.Module, capture: "FeatureCapture") -> None:
        """Ask `capture` for the features this loss reads, precompute constants; raise MMTuningError if the
        model cannot give them."""

    def forward(self, features: "StepFeatures") -> torch.Tensor | None:  # pragma: no cover - abstract
        """The unweighted loss for the current batch, or None when it must be skipped for this batch."""
        raise NotImplementedError

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (weight-space edits such as sparsification)."""

    def detach(self) -> None:
        """Undo anything `attach` changed outside this module."""
