"""Module-name layouts of a model type across transformers versions, as data a `ModalityMap` carries.

A map's `history` lists, per version step, ordered regex renames forward (old -> new) and backward
(new -> old); `mmtune convert` reads it from the registry, so a map registered by a plugin also serves
remap, merge, split and resize. The facts come from transformers' own `_checkpoint_conversion_mapping`
(4.52-4.57) and the v5 removal of CLIP/SigLIP's inner `vision_model.` level (docs/convert.md, "Layouts"). Names are
module names without PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS: tuple[str, ...] = ("<=4.51", "4.52-4.57", "5.x")
CURRENT = "5.x"
Renames = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Step:
    """One version step (LAYOUTS[i] -> LAYOUTS[i+1]): forward and backward renames, applied first match only."""

    forward: Renames = ()
    backward: Renames = ()


@dataclass(frozen=True)
class History:
    """A model type's names in every layout: the two version steps, and the layouts it did not exist in."""

    steps: tuple[Step, Step]  # <=4.51 -> 4.52-4.57, 4.52-4.57 -> 5.x
    absent: tuple[str, ...] = ()


# Names match whole dotted components: `(?=\.|$)` ends a component, so bare container names convert too.
_END = r"(?=\.|$)"


def submodels_under_model(vision: str) -> Step:
    """4.52 moved sub-models under `model.` and lm_head to the top (LLaVA-style ForConditionalGeneration)."""
    return Step(
        forward=((rf"^language_model\.model{_END}", "model.language_model"), (rf"^language_model\.lm_head{_END}", "lm_head"),
                 (rf"^{vision}{_END}", f"model.{vision}"), (rf"^multi_modal_projector{_END}", "model.multi_modal_projector")),
        backward=((rf"^model\.language_model{_END}", "language_model.model"), (rf"^lm_head{_END}", "language_model.lm_head"),
                  (rf"^model\.{vision}{_END}", vision), (rf"^model\.multi_modal_projector{_END}", "multi_modal_projector")),
    )


# v5: CLIP/SigLIP vision models lost their inner `vision_model.` level.
CLIP_INNER_LEVEL = Step(forward=((rf"^model\.vision_tower\.vision_model{_END}", "model.vision_tower"),),
                        backward=((rf"^model\.vision_tower{_END}", "model.vision_tower.vision_model"),))
UNCHANGED = Step()

# Qwen2-VL: visual moved under model., the text decoder from model. to model.language_model.
QWEN2_VL_TO_452 = Step(
    forward=((rf"^visual{_END}", "model.visual"),
             (rf"^model{_END}(?!\.(?:language_model|visual){_END})", "model.language_model")),
    backward=((rf"^model\.visual{_END}", "visual"), (rf"^model\.language_model{_END}", "model")))

# Same names in every layout (a model type whose module tree never moved).
STABLE = History((UNCHANGED, UNCHANGED))
# Only the 5.x names are known: converting into or from older layouts is refused, never guessed.
ONLY_CURRENT = History((UNCHANGED, UNCHANGED), absent=("<=4.51", "4.52-4.57"))
