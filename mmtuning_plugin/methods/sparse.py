"""A sparse weight delta as a PEFT method: `y = W x + D x` with D stored as (row, column) indices and values.

What `mmtune convert tailor` writes: the salient share of a LoRA adapter's delta, exactly, so the base's other
weights stay untouched (the point of posterior tailoring) and the result still loads with
`PeftModel.from_pretrained` and scores with `mmtune eval`. The indices are a persistent buffer, so they are saved
with the values; `counts` in the config sizes them before loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .peft_types import register_with_peft
from .tuner import ExactTargetsConfig, LinearAdapterLayer, LinearTuner

PEFT_NAME, PREFIX = "mmt_sparse", "sparse_"


@dataclass
class SparseDeltaConfig(ExactTargetsConfig):
    """PEFT config of a sparse delta per module (peft_type MMT_SPARSE)."""

    peft_name = PEFT_NAME

    counts: dict = field(default_factory=dict, metadata={"help": "Exact module name -> number of delta entries."})


class SparseDeltaLayer(LinearAdapterLayer):
    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices",)
    not_mergeable = ("a tailored sparse delta is kept as an adapter; merge the LoRA it came from, or load this one "
                     "with PeftModel.from_pretrained after mmtuning_plugin.methods.register_peft_methods()")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._wrap(base_layer)
        self.sparse_values = nn.ParameterDict({})
        self.sparse_indices = BufferDict({}, persistent=True)

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


class SparseDeltaModel(LinearTuner):
    prefix: str = PREFIX
    tuner_layer_cls = SparseDeltaLayer
    linear_class = SparseDeltaLinear

    def layer_settings(self, peft_config: SparseDeltaConfig, current_key: str) -> dict:
        return {"count": peft_config.counts[current_key]}


def register() -> None:
    register_with_peft(PEFT_NAME, SparseDeltaConfig, SparseDeltaModel, PREFIX)
