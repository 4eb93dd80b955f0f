"""Bottleneck adapters as a PEFT method: after a block's output projection, `y + up(act(down(y)))`.

The additive paradigm's classic (Houlsby / Pfeiffer adapters): a down-projection to `width`, a nonlinearity, an
up-projection back, and the residual. The up-projection starts at zero, so the wrapped model starts equal to the
base. It wraps the block's last Linear (attention output, MLP down-projection), whose output is the block's
output, so it works the same over 16-bit and 4-bit bases. Nonlinear: it cannot merge into a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import MMTuningError
from .peft_types import extend_peft_type, register_with_peft

NONLINEARITIES = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu,
                  "tanh": torch.tanh}
PEFT_NAME, PREFIX = "mmt_bottleneck", "bottleneck_"
NOT_MERGEABLE = ("a bottleneck adapter is nonlinear (up(act(down(y)))), so it has no weight delta to merge; keep it "
                 "as an adapter (PeftModel.from_pretrained) or train method: lora to merge")


@dataclass
class BottleneckConfig(PeftConfig):
    """PEFT config of mmtuning's bottleneck adapters (peft_type MMT_BOTTLENECK)."""

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Exact module names."})
    width: int = field(default=16, metadata={"help": "Bottleneck width (hidden size of the adapter)."})
    width_pattern: dict = field(default_factory=dict, metadata={"help": "Exact module name -> its width."})
    nonlinearity: str = field(default="gelu", metadata={"help": f"One of {', '.join(NONLINEARITIES)}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(PEFT_NAME)
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: {self.nonlinearity!r}; write one of {', '.join(NONLINEARITIES)}")


class BottleneckLayer(BaseTunerLayer):
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_width", "bottleneck_dropout", "bottleneck_act")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_width: dict[str, int] = {}
        self.r = self.bottleneck_width  # what mmtuning's check after wrapping compares with the plan
        self.bottleneck_act: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, width: int, dropout: float, nonlinearity: str) -> None:
        self.bottleneck_width[adapter_name] = width
        self.bottleneck_act[adapter_name] = nonlinearity
        self.bottleneck_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bottleneck_down[adapter_name] = nn.Linear(self.out_features, width)
        up = nn.Linear(width, self.out_features)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise MMTuningError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        raise MMTuningError(NOT_MERGEABLE)


class BottleneckLinear(nn.Module, BottleneckLayer):
    """A Linear (16-bit, 4-bit or 8-bit) followed by bottleneck adapters on its output."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, width: int, dropout: float, nonlinearity: str):
        super().__init__()
        BottleneckLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, width, dropout, nonlinearity)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            hidden = down(self.bottleneck_dropout[name](result.to(down.weight.dtype)))
            delta = self.bottleneck_up[name](NONLINEARITIES[self.bottleneck_act[name]](hidden))
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """PEFT tuner that puts bottleneck adapters after the targeted Linear modules."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, peft_config: BottleneckConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        width = peft_config.width_pattern.get(current_key, peft_config.width)
        settings = dict(width=width, dropout=peft_config.dropout, nonlinearity=peft_config.nonlinearity)
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, **settings)
            return
        if not isinstance(target, nn.Linear):
            raise MMTuningError(f"{current_key}: a bottleneck adapter follows a Linear module, not a "
                                f"{type(target).__name__}; leave it out of the targets")
        new_module = BottleneckLinear(target, adapter_name, **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register() -> None:
    register_with_peft(PEFT_NAME, BottleneckConfig, BottleneckModel, PREFIX)
