"""What an adapter method is to mmtuning: the module kinds it adapts, how it sizes and places its adapters, the
PEFT config it builds, and what `mmtune convert` can do with what it saves.

A method is a class registered by name through the pluggy hook `register_methods` (built-ins included, in
`builtin.py`); `method:` in the block names it and `method_options` (or the block form `{name: ..., ...}`) fills
its `Options`. Class methods only: a method holds no state, the PEFT layers it creates do.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..config import MethodOptions


class AdapterMethod:
    """Base class of a registered adapter method; override what differs from a plain low-rank adapter."""

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    summary: ClassVar[str] = ""
    # Module types (`Leaf.module_type`) it can wrap; Linear subclasses (4-bit, 8-bit) count as Linear.
    leaf_types: ClassVar[tuple[str, ...]] = ("Linear",)
    bare_parameters: ClassVar[bool] = False  # adapts bare weights through PEFT `target_parameters` (LoRA only)
    ranked: ClassVar[bool] = True  # its PEFT layers record their size per module (`layer.r[adapter]`) to verify
    # Where a PEFT parameter name leaves the adapted module's name (`<module>.lora_A.default.weight`).
    markers: ClassVar[tuple[str, ...]] = ()
    peft_type: ClassVar[str] = ""  # `peft_type` in the adapter_config.json it saves
    # Why `mmtune convert` (merge, export, resize, combine: LoRA-delta arithmetic) cannot take its adapters;
    # empty where it can.
    not_convertible: ClassVar[str] = "mmtune convert works on LoRA deltas (lora_A/lora_B per weight)"

    @classmethod
    def check(cls, config: Any) -> None:
        """Raise ValueError for block settings this method cannot honour (runs inside the schema's validation)."""

    @classmethod
    def default_losses(cls, options: MethodOptions) -> dict[str, dict]:
        """Loss terms the method brings (`{name: options}`), added to `losses:` unless the block sets them."""
        return {}

    @classmethod
    def place(cls, leaves: list) -> list:
        """Where the adapters go among the chosen leaves of one modality (all of them, for weight adapters)."""
        return leaves

    @classmethod
    def size(cls, leaf: Any, r: int, config: Any) -> int:
        """What its layer on `leaf` records as `r` (the rank; a bottleneck's width), checked after wrapping."""
        return r

    @classmethod
    def trainable(cls, leaf: Any, r: int, config: Any) -> int | None:
        """Parameters its adapter on `leaf` adds (None when not known before wrapping)."""
        in_features, out_features = features(leaf)
        return r * (in_features + out_features)

    @classmethod
    def peft_config(cls, plan: Any, common: dict[str, Any], overrides: dict[str, Any]):
        """The PEFT config that wraps exactly `plan`'s modules. `common`: target_modules and modules_to_save."""
        raise NotImplementedError

    @classmethod
    def describe(cls, options: MethodOptions) -> dict[str, Any]:
        """What `inspect-targets` and the run report show of the method's options."""
        return options.model_dump()


def features(leaf: Any) -> tuple[int, int]:
    """(in, out) features of a leaf's weight: Linear (out, in), Conv (out, in, *kernel), Embedding (num, dim)."""
    shape = leaf.shape
    if leaf.module_type == "Embedding":
        return shape[0], shape[1]
    return shape[1] * math.prod(shape[2:]), shape[0]
