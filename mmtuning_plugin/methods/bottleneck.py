"""Bottleneck adapters as a PEFT method: after a block's output projection, `y + up(act(down(y)))`.

The additive paradigm's classic (Houlsby / Pfeiffer adapters): a down-projection to `width`, a nonlinearity, an
up-projection back, and the residual. The up-projection starts at zero, so the wrapped model starts equal to the
base. It wraps the block's last Linear (attention output, MLP down-projection), whose output is the block's
output, so it works the same over 16-bit and 4-bit bases. Nonlinear: it cannot merge into a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .peft_types import register_with_peft
from .tuner import ExactTargetsConfig, LinearAdapterLayer, LinearTuner

NONLINEARITIES = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu,
                  "tanh": torch.tanh}
PEFT_NAME, PREFIX = "mmt_bottleneck", "bottleneck_"


@dataclass
class BottleneckConfig(ExactTargetsConfig):
    """PEFT config of mmtuning's bottleneck adapters (peft_type MMT_BOTTLENECK)."""

    peft_name = PEFT_NAME

    width: int = field(default=16, metadata={"help": "Bottleneck width (hidden size of the adapter)."})
    width_pattern: dict = field(default_factory=dict, metadata={"help": "Exact module name -> its width."})
    nonlinearity: str = field(default="gelu", metadata={"help": f"One of {', '.join(NONLINEARITIES)}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})

    def __post_init__(self):
        super().__post_init__()
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: {self.nonlinearity!r}; write one of {', '.join(NONLINEARITIES)}")


class BottleneckLayer(LinearAdapterLayer):
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_width", "bottleneck_dropout", "bottleneck_act")
    not_mergeable = ("a bottleneck adapter is nonlinear (up(act(down(y)))), so it has no weight delta to merge; keep "
                     "it as an adapter (PeftModel.from_pretrained) or train method: lora to merge")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._wrap(base_layer)
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_width: dict[str, int] = {}
        self.r = self.bottleneck_width  # what mmtuning's check after wrapping compares with the plan
        self.bottleneck_act: dict[str, str] = {}

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


class BottleneckModel(LinearTuner):
    """PEFT tuner that puts bottleneck adapters after the targeted Linear modules."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    linear_class = BottleneckLinear

    def layer_settings(self, peft_config: BottleneckConfig, current_key: str) -> dict:
        return dict(width=peft_config.width_pattern.get(current_key, peft_config.width), dropout=peft_config.dropout,
                    nonlinearity=peft_config.nonlinearity)


def register() -> None:
    register_with_peft(PEFT_NAME, BottleneckConfig, BottleneckModel, PREFIX)
