"""PEFT parameter name -> planned module -> modality, written once for every caller.

PEFT names a trainable tensor `base_model.model.<module>.lora_A.default.weight`; the part before the adapter
marker (`.lora_`, `.modules_to_save.`, ...) is the module the target plan names. A module's modality comes from
its modality map, and the longest prefix wins: Qwen-VL's projector `model.visual.merger` sits inside its vision
tower `model.visual`, so `model.visual.merger.ln_q` is projector, not vision.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from .arch import MODALITIES, ModalityMap, owner_modality

PEFT_PREFIX = "base_model.model."
# Where a PEFT parameter name leaves the adapted module's own name (`<module>.lora_A.default.weight`), besides
# the markers each registered method declares (`AdapterMethod.markers`).
OTHER_MARKERS = (".modules_to_save.", ".oft_", ".boft_", ".vera_")
# Children PEFT adds inside an adapted module: never modules of the base model themselves.
ADAPTER_CHILDREN = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save",
                              "base_layer", "lora_magnitude_vector"})
# Wrapper levels PEFT inserts between a module's name and its own children.
_WRAPPER_LEVEL = re.compile(r"\.(base_layer|original_module)(?=\.|$)")


def module_of(name: str) -> str:
    """`base_model.model.<module>.lora_A.default.weight` -> `<module>`; also strips PEFT's wrapper levels from
    module names (`<module>.base_layer`, `<module>.original_module`)."""
    while name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    for marker in adapter_markers():
        if marker in name:
            name = name.split(marker)[0]
            break
    return _WRAPPER_LEVEL.sub("", name)


def is_adapter_parameter(name: str) -> bool:
    """A tensor PEFT created (LoRA factors, a trained-whole copy), as opposed to a base model weight."""
    return any(marker in name for marker in adapter_markers())


def adapter_markers() -> tuple[str, ...]:
    """Every marker of a PEFT-created tensor name: the registered methods' and the others'."""
    from .plugins import registrations

    return _markers(registrations("methods"))


@functools.lru_cache(maxsize=4)
def _markers(methods: tuple) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for r in methods for m in r.obj.markers)) + OTHER_MARKERS


def is_adapter_child(module_name: str) -> bool:
    """A module PEFT added inside an adapted one (`q_proj.lora_A`, `q_proj.base_layer`, a modules_to_save copy)."""
    prefixes = tuple(marker.strip(".") for marker in adapter_markers())
    return any(part in ADAPTER_CHILDREN or part.startswith(prefixes) for part in module_name.split("."))


def modality_by_map(name: str, modality_map: ModalityMap) -> str | None:
    """vision / projector / language of a module or parameter name from the map's prefixes (longest wins)."""
    return owner_modality(name, {p: m for m in MODALITIES for p in modality_map.prefixes(m)})


def modality_of_parameter(plan: Any, parameter_name: str) -> str | None:
    """Modality of a trainable parameter name such as `base_model.model.<module>.lora_A.default.weight`
    under a `targets.TargetPlan` (names sits below targets, so the plan is not imported): the planned module (or bare parameter) it adapts, or a module the plan trains whole (the projector)."""
    name = module_of(parameter_name)
    found = plan.modality_of(name)
    if found:
        return found
    for parameter in plan.parameters:  # a ParamWrapper sits at the bare parameter's module
        if parameter.name.rsplit(".", 1)[0] == name:
            return parameter.modality
    if any(name == whole or name.startswith(whole + ".") for whole in plan.modules_to_save):
        return "projector"
    return None
