"""The built-in modality maps (transformers 5.x module names), registered as a pluggy plugin.

Each entry is a fact checked against transformers 5.23 (docs/architectures.md lists them; tests/test_arch.py builds each). To support a new
model type, add an entry here or, from another package, register one through the same hook.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import ModalityMap

# LLaVA-style layout: model.vision_tower / model.multi_modal_projector / model.language_model.
_LLAVA_STYLE = dict(
    vision=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    language=("model.language_model",),
    language_layers=("model.language_model.layers",),
)
_CLIP_LAYERS = ("model.vision_tower.encoder.layers",)
_QWEN_VISION = dict(
    vision=("model.visual",),
    language=("model.language_model",),
    vision_layers=("model.visual.blocks",),
    language_layers=("model.language_model.layers",),
)
_IDEFICS_STYLE = dict(
    vision=("model.vision_model",),
    projector=("model.connector",),
    language=("model.text_model",),
    vision_layers=("model.vision_model.encoder.layers",),
    language_layers=("model.text_model.layers",),
)

BUILTIN_MAPS: tuple[ModalityMap, ...] = (
    ModalityMap(("llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava", "paligemma"),
                vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE),
    ModalityMap(("aya_vision",), vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE,
                # transformers' default AyaVisionConfig pairs 1152 hidden with 14 heads and cannot be built;
                # Aya Vision 8B's SigLIP tower has 16.
                default_config_fixes={"vision_config.num_attention_heads": 16}),
    ModalityMap(("gemma3",), vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE,
                projector_parameters=("model.multi_modal_projector.mm_input_projection_weight",)),
    ModalityMap(("mistral3",), vision_layers=("model.vision_tower.transformer.layers",), **_LLAVA_STYLE),
    ModalityMap(("internvl",), vision_layers=("model.vision_tower.encoder.layer",), **_LLAVA_STYLE),
    ModalityMap(("qwen2_vl", "qwen2_5_vl"), projector=("model.visual.merger",), **_QWEN_VISION),
    ModalityMap(("qwen3_vl",), projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
                **_QWEN_VISION),
    ModalityMap(("idefics3", "smolvlm"), **_IDEFICS_STYLE,
                # transformers 5.6 (LLaMA-Factory 0.9.5's pin) and 5.16 (Axolotl 0.19's) default the text
                # pad_token_id to 128002 with a 32000-token vocab, which cannot be built; 5.23 defaults it to None.
                default_config_fixes={"text_config.pad_token_id": None}),
    ModalityMap(("mllama",),
                vision=("model.vision_model",),
                projector=("model.multi_modal_projector",),
                language=("model.language_model",),
                # local layers first, then the global ones: vision layer indices run through both stacks
                vision_layers=("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
                language_layers=("model.language_model.layers",),
                cross_attention_layers="text_config.cross_attention_layers"),
)


@hookimpl
def register_architectures(register):
    for modality_map in BUILTIN_MAPS:
        register(modality_map)
