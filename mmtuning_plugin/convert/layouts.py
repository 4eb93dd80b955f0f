"""Module-name layouts of vision-language models across transformers versions, read from the registry.

Each model type's history (ordered regex renames per version step, and the layouts it did not exist in) is
part of its `ModalityMap` (arch/history.py, arch/builtin.py): one registration per architecture serves both
training and `mmtune convert`, for built-in and plugin maps alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..arch.history import CURRENT, LAYOUTS, Renames, Step
from ..errors import MMTuningError

__all__ = ["CURRENT", "LAYOUTS", "LayoutFamily", "Step", "family_of", "check_layout", "rename", "spell",
           "CHECKPOINT_SPELLINGS"]


@dataclass(frozen=True)
class LayoutFamily:
    model_types: tuple[str, ...]
    steps: tuple[Step, Step]  # <=4.51 -> 4.52-4.57, 4.52-4.57 -> 5.x
    # layouts in which the model type did not exist (converting into them is refused)
    absent: tuple[str, ...] = ()


def family_of(model_type: str) -> LayoutFamily:
    """The layout history of `model_type` from its registered modality map."""
    from ..arch import registered_maps

    maps = registered_maps()
    mmap = maps.get(model_type)
    if mmap is None:
        raise MMTuningError(f"No modality map for model type '{model_type}', so no layout history: convert knows "
                            f"{', '.join(sorted(maps))}. Register a ModalityMap for it from a plugin "
                            f"(docs/architecture.md); its `history` says how its names moved across transformers.")
    return LayoutFamily(mmap.model_types, mmap.history.steps, mmap.history.absent)


def check_layout(name: str, option: str) -> str:
    if name not in LAYOUTS:
        raise MMTuningError(f"{option} {name!r} is not a layout; write one of {', '.join(LAYOUTS)}.")
    return name


def _apply(renames: Renames, name: str) -> str:
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, name, count=1)
        if count:
            return renamed
    return name


def rename(name: str, family: LayoutFamily, source: str, target: str) -> str:
    """A module (or tensor) name in layout `source`, written in layout `target`."""
    start, end = LAYOUTS.index(source), LAYOUTS.index(target)
    if start < end:
        for step in family.steps[start:end]:
            name = _apply(step.forward, name)
    else:
        for step in reversed(family.steps[end:start]):
            name = _apply(step.backward, name)
    return name


# Backward step combinations a saved checkpoint may use for 5.x names: transformers 5 saves some legacy
# prefixes (a LLaVA saved by 5.23 has `language_model.model.*` but `vision_tower.encoder.*`).
CHECKPOINT_SPELLINGS: tuple[tuple[str, ...], ...] = ((), ("step2",), ("step1",), ("step2", "step1"))


def spell(name: str, family: LayoutFamily, combo: tuple[str, ...]) -> str:
    """A 5.x name with the given backward steps applied (see CHECKPOINT_SPELLINGS)."""
    for step_name in combo:
        name = _apply(family.steps[1 if step_name == "step2" else 0].backward, name)
    return name
