"""`moe_balance`: MoE-LoRA's load-balance term, so that no expert takes every token (method `moe-lora` adds it
with weight `balance`, 0.01 by default).

Each MoE-LoRA layer keeps the statistic of its last training forward (Switch Transformer's: experts x sum over
experts of token share x mean gate; 1.0 when balanced); this term is their mean over the model's layers.
"""

from __future__ import annotations

import torch

from ..errors import MMTuningError
from .base import AlignmentLoss


class MoeBalanceLoss(AlignmentLoss):
    def attach(self, model, capture) -> None:
        from ..methods.moe_lora import moe_layers

        self.layers = moe_layers(model)  # a plain list: the layers stay the model's, not this module's
        if not self.layers:
            raise MMTuningError("mmtuning.losses.moe_balance: balances the experts of MoE-LoRA, but the model has no "
                                "moe-lora layer; write `method: moe-lora`, or remove moe_balance from losses")

    def forward(self, features) -> torch.Tensor | None:
        values = [layer.balance for layer in self.layers if layer.balance is not None]
        for layer in self.layers:
            layer.balance = None
        return torch.stack(values).mean() if values else None
