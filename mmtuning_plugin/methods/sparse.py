"""A sparse weight delta as a PEFT method: `y = W x + D x` with D stored as (row, column) indices and values.

What `mmtune convert tailor` writes: the salient share of a LoRA adapter's delta, exactly, so the base's other
weights stay untouched (the point of posterior tailoring) and the result still loads with
`PeftModel.from_pretrained` and scores with `mmtune eval`. The indices are a persistent buffer, so they are saved
with the values; `counts` in the config sizes them before loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import MMTuningError
from .peft_types import extend_peft_type, register_with_peft

PEFT_NAME, PREFIX = "mmt_sparse", "sparse_"


@dataclass
class SparseDeltaConfig(PeftConfig):
    """PEFT config of a sparse delta per module (peft_type MMT_SPARSE)."""

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Exact module names."})
    counts: dict = field(default_factory=dict, metadata={"help": "Exact module name -> number of delta entries."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(PEFT_NAME)


class SparseDeltaLayer(BaseTunerLayer):
    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices",)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sparse_values = nn.ParameterDict({})
        self.sparse_indices = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, count: int) -> None:
        self.sparse_values[adapter_name] = nn.Parameter(torch.zeros(count))
        self.sparse_indices[adapter_name] = torch.zeros(2, count, dtype=torch.long)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def delta(self, adapter_name: str) -> torch.Tensor:
        values = self.sparse_values[adapter_name]
        rows, columns = self.sparse_indices[adapter_name]
        dense = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
        return dense.index_put((rows, columns), values)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise MMTuningError("a tailored sparse delta is kept as an adapter; merge the LoRA it came from, or load this "
                            "one with PeftModel.from_pretrained after mmtuning_plugin.methods.register_peft_methods()")

    def unmerge(self) -> None:
        self.merge()


class SparseDeltaLinear(nn.Module, SparseDeltaLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, count: int):
        super().__init__()
        SparseDeltaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, count)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.sparse_values:
                delta = self.delta(name)
                result = result + nn.functional.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()


class SparseDeltaModel(BaseTuner):
    prefix: str = PREFIX
    tuner_layer_cls = SparseDeltaLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, peft_config: SparseDeltaConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        count = peft_config.counts[current_key]
        if isinstance(target, SparseDeltaLayer):
            target.update_layer(adapter_name, count)
            return
        if not isinstance(target, nn.Linear):
            raise MMTuningError(f"{current_key}: a sparse delta applies to Linear modules, not a {type(target).__name__}")
        new_module = SparseDeltaLinear(target, adapter_name, count)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register() -> None:
    register_with_peft(PEFT_NAME, SparseDeltaConfig, SparseDeltaModel, PREFIX)
