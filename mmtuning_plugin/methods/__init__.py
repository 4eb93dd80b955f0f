"""Adapter methods: a registry (pluggy hook `register_methods`) of what `method:` names, and mmtuning's own PEFT
methods (bottleneck adapters, MoE-LoRA, and the sparse delta `mmtune convert tailor` writes).

A saved `adapter` or `moe-lora` adapter loads with `PeftModel.from_pretrained` in a fresh process once
`register_peft_methods()` has told PEFT about them (mmtuning's own loaders do it).
"""

from __future__ import annotations

from ..config import registered_methods
from .base import AdapterMethod, features

__all__ = ["AdapterMethod", "features", "method_of", "registered_methods", "method_by_peft_type", "register_peft_methods"]


def method_of(config) -> type[AdapterMethod]:
    """The registered method class of a block (`config.method`)."""
    return registered_methods()[config.method]


def method_by_peft_type(peft_type: str) -> tuple[str, type[AdapterMethod]] | None:
    """(name, class) of the registered method that saves adapters of `peft_type`, if any."""
    return next(((name, cls) for name, cls in registered_methods().items() if cls.peft_type == peft_type), None)


def register_peft_methods() -> None:
    """Tell PEFT about mmtuning's methods (idempotent): what `PeftModel.from_pretrained` needs to load them."""
    from .bottleneck import register as register_bottleneck
    from .moe_lora import register as register_moe_lora
    from .sparse import register as register_sparse

    register_bottleneck()
    register_moe_lora()
    register_sparse()
