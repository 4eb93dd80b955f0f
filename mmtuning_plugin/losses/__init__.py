"""Cross-modal alignment losses and forgetting regularizers, added to the host trainer's task loss.

    mmtuning:
      losses:
        anchor: {weight: 0.1, metric: cosine, warmup_steps: 10}
        contrastive: {weight: 0.05, temperature: 0.07, learnable_temperature: true}
        sculpt: {weight: 1.0e-3, sparsify_from: 100, keep: 0.1}
        multiscale: {of: anchor, layers: [-1, -2]}

Each loss is an `AlignmentLoss` registered by name through the pluggy hook `register_losses`; features
come from forward hooks (`capture.py`) during the host's own forward pass. `LossSuite` is what the
`MMTuning` session holds: attach to a wrapped model, compute the weighted terms, step callbacks, detach.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import validate_losses
from ..errors import MMTuningError
from .base import AlignmentLoss, LossOptions
from .capture import FeatureCapture, StepFeatures

LOG_PREFIX = "loss_align/"
CONTAINER = "mmtuning_losses"  # the child module of the model that holds the loss modules (learnable temperature)

__all__ = ["AlignmentLoss", "LossOptions", "LossSuite", "registered_losses", "validate_losses", "LOG_PREFIX"]


def registered_losses() -> dict[str, type[AlignmentLoss]]:
    """name -> loss class from every plugin (built-ins included); a later plugin overrides a name."""
    from ..plugins import registered

    return registered("losses")


class LossSuite:
    """The configured losses of one run: hooks on the model, weighted terms per step, step callbacks."""

    def __init__(self, options: dict[str, LossOptions]):
        self.options = dict(options)
        self.step = 0
        self.losses: nn.ModuleDict | None = None
        self.capture: FeatureCapture | None = None
        self.model: nn.Module | None = None
        self.image_token_id: int | None = None

    def __bool__(self) -> bool:
        return bool(self.options)

    def attach(self, model: nn.Module) -> None:
        """Hook the model and build the losses (idempotent). Raises MMTuningError if a loss cannot apply."""
        if not self.options or self.model is model:
            return
        if self.model is not None:
            self.detach()
        from ..arch import image_token_id, resolve_layout, unwrap

        layout = resolve_layout(model)
        known = registered_losses()
        capture = FeatureCapture(model, layout)
        losses = nn.ModuleDict()
        try:
            for name, options in self.options.items():
                loss = known[name](name, options)
                if loss.needs_image_tokens and layout.modality_map.cross_attention_layers is not None:
                    raise MMTuningError(
                        f"mmtuning.losses.{name}: needs image tokens inside the language sequence, but "
                        f"'{layout.model_type}' feeds images through cross-attention layers. Use `anchor` or "
                        f"`sculpt` (they need no image tokens), or remove `{name}`.")
                loss.attach(model, capture)
                losses[name] = loss
        except Exception:
            capture.remove()
            raise
        try:
            self.image_token_id = image_token_id(unwrap(model).config)
        except ValueError:
            self.image_token_id = None
        parameter = next(model.parameters(), None)
        if parameter is not None:
            losses.to(parameter.device)
        model.add_module(CONTAINER, losses)
        self.losses, self.capture, self.model = losses, capture, model

    def detach(self) -> None:
        """Remove every hook and the loss modules from the model."""
        if self.capture is not None:
            self.capture.remove()
        if self.losses is not None:
            for loss in self.losses.values():
                loss.detach()
        if self.model is not None and hasattr(self.model, CONTAINER):
            delattr(self.model, CONTAINER)
        self.losses = self.capture = self.model = None

    def compute(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`{"loss_align/<name>": weighted term}` for the batch whose forward just ran."""
        if not self.options:
            return {}
        if self.losses is None or self.capture is None:
            raise MMTuningError("mmtuning losses are configured but not attached to the model: call "
                                "MMTuning.wrap(model) or MMTuning.attach(model) before training.")
        features = StepFeatures(self.capture.records, inputs, self.image_token_id, self.capture)
        terms: dict[str, torch.Tensor] = {}
        try:
            for name, loss in self.losses.items():
                factor = loss.options.factor(self.step)
                if factor == 0:
                    continue
                value = loss(features)
                if value is not None:
                    terms[LOG_PREFIX + name] = value * factor
        finally:
            self.capture.records.clear()
        return terms

    def step_end(self, step: int) -> None:
        self.step = step
        if self.losses is not None:
            for loss in self.losses.values():
                loss.on_step_end(self.model, step)

    def callbacks(self) -> list[Any]:
        """A transformers TrainerCallback feeding the optimizer step to warm-ups and sparsification."""
        if not self.options:
            return []
        from transformers import TrainerCallback

        suite = self

        class AlignmentLossStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                suite.step = state.global_step

            def on_step_end(self, args, state, control, **kwargs):
                suite.step_end(state.global_step)

        return [AlignmentLossStep()]
