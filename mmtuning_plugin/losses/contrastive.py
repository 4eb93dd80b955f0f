"""`contrastive`: symmetric InfoNCE between each sample's pooled image tokens and its pooled answer text.

Image side: the projected image features where the language model receives them (its input embeddings
at image-token positions); text side: the language model's last hidden state over answer tokens. Other
samples of the batch are the negatives, so a batch needs at least 2 samples with images; otherwise the
term is skipped with a one-time warning.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import AlignmentLoss, LossOptions
from .capture import FeatureCapture, StepFeatures, first_tensor, masked_mean

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: a learnable temperature may not fall below 0.01


class ContrastiveOptions(LossOptions):
    weight: float = Field(default=0.05, ge=0)
    temperature: float = Field(default=0.07, gt=0, description="Softmax temperature (initial value when learnable).")
    learnable_temperature: bool = Field(default=True, description="Train log(1/temperature) with the adapters.")


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over matching rows of `image` and `text` (N, D)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ContrastiveLoss(AlignmentLoss):
    Options = ContrastiveOptions
    needs_image_tokens = True

    def __init__(self, name: str, options: ContrastiveOptions):
        super().__init__(name, options)
        initial = torch.tensor(math.log(1.0 / options.temperature), dtype=torch.float32)
        if options.learnable_temperature:
            self.logit_scale = nn.Parameter(initial)
        else:
            self.register_buffer("logit_scale", initial, persistent=False)
        self._warned = False

    def attach(self, model: nn.Module, capture: FeatureCapture) -> None:
        self._image_key = capture.language_input()
        self._text_key = capture.language_output()

    def forward(self, features: StepFeatures) -> torch.Tensor | None:
        image_states = first_tensor(features.get(self._image_key)[-1].output)
        return self.pair_loss(image_states, features.output(self._text_key), features)

    def pair_loss(self, image_states: torch.Tensor, text_states: torch.Tensor, features: StepFeatures):
        image_mask, text_mask = features.image_mask(), features.text_mask()
        usable = image_mask.any(dim=1) & text_mask.any(dim=1)
        if int(usable.sum()) < 2:
            self._warn_once(int(usable.sum()))
            return None
        image = masked_mean(image_states, image_mask)[usable]
        text = masked_mean(text_states, text_mask)[usable]
        return info_nce(image, text, self.logit_scale.float())

    def _warn_once(self, count: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"mmtuning.losses.{self.name}: a batch had {count} sample(s) with both image tokens and "
                          f"answer text; contrastive alignment needs at least 2 per batch (per device) and is skipped "
                          f"for such batches. Raise per_device_train_batch_size to use it.", stacklevel=2)
