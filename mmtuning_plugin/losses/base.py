"""What every alignment loss is: options (pydantic), the features it asks for, and a forward that returns
one unweighted scalar. The suite applies weight and warm-up, so a loss stays a few lines of math."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

if TYPE_CHECKING:
    from .capture import FeatureCapture, StepFeatures


class LossOptions(BaseModel):
    """Options every loss has; a loss subclasses this to add its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=0.1, ge=0, description="Multiplier of this term in the total loss.")
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0 over these optimizer steps.")

    @model_validator(mode="after")
    def _weight_does_something(self):
        if self.weight == 0 and not self.acts_without_weight():
            raise ValueError("weight: 0 turns this loss into a no-op; remove the loss or give it a positive weight")
        return self

    def acts_without_weight(self) -> bool:
        """True when the loss changes training even at weight 0 (sculpt's sparsification)."""
        return False

    def factor(self, step: int) -> float:
        """The weight at optimizer step `step` (linear warm-up, then constant)."""
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)


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
