"""The built-in losses, registered through the same pluggy hook a third-party package uses."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .anchor import AnchorLoss
from .contrastive import ContrastiveLoss
from .moe_balance import MoeBalanceLoss
from .multiscale import MultiscaleLoss
from .sculpt import SculptLoss

BUILTIN_LOSSES = {"contrastive": ContrastiveLoss, "anchor": AnchorLoss, "sculpt": SculptLoss,
                  "multiscale": MultiscaleLoss, "moe_balance": MoeBalanceLoss}


@hookimpl
def register_losses(register):
    for name, loss_class in BUILTIN_LOSSES.items():
        register(name, loss_class)
