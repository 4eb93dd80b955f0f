"""mmtuning's own PEFT methods (bottleneck adapters, MoE-LoRA) registered with PEFT, so `get_peft_model`,
`save_pretrained` and `PeftModel.from_pretrained` treat them like PEFT's own.

PEFT's `register_peft_method` only accepts a name that its `PeftType` enum already has, so the member is added
to the enum first. `mmtuning_plugin.methods.register_peft_methods()` registers them; loading a saved adapter in
a fresh process needs that call first (mmtune eval makes it).
"""

from __future__ import annotations

import functools


def extend_peft_type(name: str):
    """The `PeftType` member NAME, added to PEFT's enum when missing (values are the upper-case names)."""
    from peft.utils.peft_types import PeftType

    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_, member._value_ = key, key
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)
    return member


@functools.lru_cache(maxsize=None)
def register_with_peft(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register one method with PEFT (once per process; PEFT refuses a second registration)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = extend_peft_type(name)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)

