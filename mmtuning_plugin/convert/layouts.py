"""Module-name layouts of vision-language models across transformers versions, as data.

Each family lists, per version step, ordered regex renames forward (old -> new) and backward (new -> old).
The facts come from transformers' own `_checkpoint_conversion_mapping` (4.52-4.57) and the v5 removal of
CLIP/SigLIP's inner `vision_model.` level (docs/convert.md, "Layouts"). Names here are module names without
PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MMTuningError

LAYOUTS: tuple[str, ...] = ("<=4.51", "4.52-4.57", "5.x")
CURRENT = "5.x"
Renames = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Step:
    """One version step (LAYOUTS[i] -> LAYOUTS[i+1]): forward and backward renames, applied first match only."""

    forward: Renames = ()
    backward: Renames = ()


@dataclass(frozen=True)
class LayoutFamily:
    model_types: tuple[str, ...]
    steps: tuple[Step, Step]  # <=4.51 -> 4.52-4.57, 4.52-4.57 -> 5.x
    # layouts in which the model type did not exist (converting into them is refused)
    absent: tuple[str, ...] = field(default=())


# Names match whole dotted components: `(?=\.|$)` ends a component, so bare container names convert too.
_END = r"(?=\.|$)"


# 4.52 moved sub-models under `model.` and lm_head to the top (LLaVA-style ForConditionalGeneration).
def _submodels_under_model(vision: str) -> Step:
    return Step(
        forward=((rf"^language_model\.model{_END}", "model.language_model"), (rf"^language_model\.lm_head{_END}", "lm_head"),
                 (rf"^{vision}{_END}", f"model.{vision}"), (rf"^multi_modal_projector{_END}", "model.multi_modal_projector")),
        backward=((rf"^model\.language_model{_END}", "language_model.model"), (rf"^lm_head{_END}", "language_model.lm_head"),
                  (rf"^model\.{vision}{_END}", vision), (rf"^model\.multi_modal_projector{_END}", "multi_modal_projector")),
    )


# v5: CLIP/SigLIP vision models lost their inner `vision_model.` level.
_CLIP_INNER_LEVEL = Step(forward=((rf"^model\.vision_tower\.vision_model{_END}", "model.vision_tower"),),
                         backward=((rf"^model\.vision_tower{_END}", "model.vision_tower.vision_model"),))
_UNCHANGED = Step()

LAYOUT_FAMILIES: tuple[LayoutFamily, ...] = (
    # CLIP/SigLIP towers
    LayoutFamily(("llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava", "paligemma", "gemma3",
                  "aya_vision"), (_submodels_under_model("vision_tower"), _CLIP_INNER_LEVEL)),
    # Pixtral tower: no inner vision_model level
    LayoutFamily(("mistral3",), (_submodels_under_model("vision_tower"), _UNCHANGED)),
    LayoutFamily(("mllama",), (_submodels_under_model("vision_model"), _UNCHANGED)),
    # Qwen2-VL: visual moved under model., the text decoder from model. to model.language_model.
    LayoutFamily(("qwen2_vl", "qwen2_5_vl"), (
        Step(forward=((rf"^visual{_END}", "model.visual"),
                      (rf"^model{_END}(?!\.(?:language_model|visual){_END})", "model.language_model")),
             backward=((rf"^model\.visual{_END}", "visual"), (rf"^model\.language_model{_END}", "model"))),
        _UNCHANGED)),
    # Idefics3/SmolVLM had model.{vision_model,connector,text_model} + lm_head since 4.4x; their own vision
    # transformer (embeddings/encoder/post_layernorm) never had an inner vision_model level.
    LayoutFamily(("idefics3", "smolvlm"), (_UNCHANGED, _UNCHANGED)),
    # added in 4.52 (internvl) and 4.57 (qwen3_vl): no <=4.51 layout
    LayoutFamily(("internvl", "qwen3_vl"), (_UNCHANGED, _UNCHANGED), absent=("<=4.51",)),
)


def family_of(model_type: str) -> LayoutFamily:
    for family in LAYOUT_FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in LAYOUT_FAMILIES for t in f.model_types)
    raise MMTuningError(f"No layout table for model type '{model_type}': remap knows {', '.join(known)}. "
                        f"Add a LayoutFamily in mmtuning_plugin/convert/layouts.py.")


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
