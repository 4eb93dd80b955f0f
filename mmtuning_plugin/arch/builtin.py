"""The built-in modality maps (transformers 5.x module names), registered as a pluggy plugin.

Each entry is a fact checked against transformers 5.23 (docs/architectures.md lists them; tests/test_arch.py builds each). To support a new
model type, add an entry here or, from another package, register one through the same hook.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import AUDIO_TOWER, SUB_CONFIG_DEFAULT, UNUSED_POOLING_HEAD, ModalityMap, Refusal
from .history import CLIP_INNER_LEVEL, QWEN2_VL_TO_452, STABLE, UNCHANGED, History, submodels_under_model

# LLaVA-style layout: model.vision_tower / model.multi_modal_projector / model.language_model.
_LLAVA_STYLE = dict(
    vision=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    language=("model.language_model",),
    language_layers=("model.language_model.layers",),
)
_CLIP_LAYERS = ("model.vision_tower.encoder.layers",)
# Older layouts: CLIP/SigLIP towers (4.52 moved sub-models under `model.`, v5 dropped `vision_model.`), the
# Pixtral tower and Mllama (4.52 only), types added in 4.52 / 4.57 (no <=4.51 layout).
_CLIP_HISTORY = History((submodels_under_model("vision_tower"), CLIP_INNER_LEVEL))
_NEW_IN_452 = History((UNCHANGED, UNCHANGED), absent=("<=4.51",))
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

_LLAVA_QWEN_IDEFICS_MLLAMA_MAPS: tuple[ModalityMap, ...] = (
    ModalityMap(("llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava", "paligemma"),
                vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE, history=_CLIP_HISTORY),
    ModalityMap(("aya_vision",), vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE, history=_CLIP_HISTORY,
                # transformers' default AyaVisionConfig pairs 1152 hidden with 14 heads and cannot be built;
                # Aya Vision 8B's SigLIP tower has 16.
                default_config_fixes={"vision_config.num_attention_heads": 16}),
    # Pixtral tower: no inner vision_model level
    ModalityMap(("mistral3",), vision_layers=("model.vision_tower.transformer.layers",), **_LLAVA_STYLE,
                history=History((submodels_under_model("vision_tower"), UNCHANGED))),
    ModalityMap(("internvl",), vision_layers=("model.vision_tower.encoder.layer",), **_LLAVA_STYLE,
                history=_NEW_IN_452),
    ModalityMap(("qwen2_vl", "qwen2_5_vl"), projector=("model.visual.merger",), **_QWEN_VISION,
                history=History((QWEN2_VL_TO_452, UNCHANGED))),
    ModalityMap(("qwen3_vl",), projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
                **_QWEN_VISION, history=_NEW_IN_452),
    # Idefics3/SmolVLM had model.{vision_model,connector,text_model} + lm_head since 4.4x; their own vision
    # transformer (embeddings/encoder/post_layernorm) never had an inner vision_model level.
    ModalityMap(("idefics3", "smolvlm"), **_IDEFICS_STYLE, history=STABLE,
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
                cross_attention_layers="text_config.cross_attention_layers",
                history=History((submodels_under_model("vision_model"), UNCHANGED))),
)


# --- every other family of the image-text-to-text mapping (module trees read from transformers 5.23/5.24 on
# the meta device; tests/test_coverage.py checks each against transformers' own composition) --------------------

_SIGLIP_HEAD = {"model.vision_tower.head": UNUSED_POOLING_HEAD}

# BLIP-2 / InstructBLIP / InstructBLIP-Video: vision model -> Q-Former -> language_projection -> OPT, Flan-T5 or
# Vicuna (LLaMA). The Q-Former and the projection are the bridge (`projector`), the Q-Former's 12 BERT-style
# layers its layer stack (`projector.layers: {top: N}`). Flan-T5 is encoder-decoder: its language layers are
# numbered encoder blocks first, then decoder blocks, so `{top: N}` is the last N decoder blocks (the ones next to
# the loss) and reaches into the encoder only when N exceeds the decoder's depth. The learned `query_tokens`
# are a bare (1, 32, 768) tensor, not a weight matrix: train them with `projector: {full: true}` only.
_QFORMER_STYLE = dict(
    vision=("vision_model",),
    projector=("qformer", "language_projection"),
    language=("language_model",),
    vision_layers=("vision_model.encoder.layers",),
    projector_layers=("qformer.encoder.layer",),
    language_layers=("language_model.model.decoder.layers",),
    language_layers_by_text_model={
        "opt": ("language_model.model.decoder.layers",),
        "t5": ("language_model.encoder.block", "language_model.decoder.block"),
        "llama": ("language_model.model.layers",),
    },
    vision_feature_layer=None,
    # Blip2/InstructBlip kept these names through 4.52 and 5.0 (not part of the `model.` move)
    history=STABLE,
)
_QWEN3_VL_PROJECTOR = ("model.visual.merger", "model.visual.deepstack_merger_list")

_BRIDGED_AND_OTHER_MAPS: tuple[ModalityMap | Refusal, ...] = (
    ModalityMap(("blip-2", "instructblip", "instructblipvideo"), **_QFORMER_STYLE),
    # BLIP (v1): the BERT text decoder reads the image through its own cross-attention; no separate bridge.
    ModalityMap(("blip",), vision=("vision_model",), projector=(), language=("text_decoder",),
                vision_layers=("vision_model.encoder.layers",), language_layers=("text_decoder.bert.encoder.layer",),
                language_extra={"lm_head": "text_decoder.cls.predictions.decoder"},
                excluded={"text_decoder.cls.predictions.transform": "BERT's MLM prediction transform before the "
                          "output projection"},
                vision_feature_layer=None, history=STABLE),
    # gemma3's layout under other names, and Qwen3-VL relatives with deepstack mergers
    ModalityMap(("gemma3", "shieldgemma2"), vision_layers=_CLIP_LAYERS, **_LLAVA_STYLE, history=_CLIP_HISTORY,
                projector_parameters=("model.multi_modal_projector.mm_input_projection_weight",),
                excluded=_SIGLIP_HEAD),
    ModalityMap(("qwen3_vl_moe", "cosmos3_omni"), projector=_QWEN3_VL_PROJECTOR, **_QWEN_VISION),
    ModalityMap(("qwen3_omni_moe_thinker",), projector=("model.visual.merger", "model.visual.merger_list"),
                **_QWEN_VISION, excluded={"model.audio_tower": AUDIO_TOWER}),
    ModalityMap(("qwen2_5_omni_thinker",), projector=("model.visual.merger",), **_QWEN_VISION,
                excluded={"model.audio_tower": AUDIO_TOWER}),
    # Llama 4: the pixel-shuffle MLP (`vision_adapter`) inside the vision model is the first half of the bridge
    ModalityMap(("llama4",), vision=("vision_model",), projector=("vision_model.vision_adapter", "multi_modal_projector"),
                language=("language_model",), vision_layers=("vision_model.model.layers",),
                language_layers=("language_model.model.layers",), vision_feature_layer=None,
                history=STABLE),
    # DeepSeek-VL hybrid: a SigLIP low-res and a SAM high-res encoder; vision layers run low-res then high-res
    ModalityMap(("deepseek_vl_hybrid",), vision=("model.vision_model", "model.high_res_vision_model"),
                projector=("model.aligner",), language=("model.language_model",),
                vision_layers=("model.vision_model.encoder.layers", "model.high_res_vision_model.vision_encoder.layers"),
                language_layers=("model.language_model.layers",), vision_feature_layer=None,
                excluded={"model.vision_model.head": UNUSED_POOLING_HEAD}),
    # Gemma 4: transformers' default config has no vision part; the map builds it with the default vision config
    ModalityMap(("gemma4",), vision=("model.vision_tower",), projector=("model.embed_vision",),
                language=("model.language_model",), vision_layers=("model.vision_tower.encoder.layers",),
                language_layers=("model.language_model.layers",),
                default_config_fixes={"vision_config": SUB_CONFIG_DEFAULT},
                excluded={"model.language_model.per_layer_model_projection":
                          "Gemma 4's per-layer input projection outside the decoder layers (not adapted)",
                          "model.audio_tower": AUDIO_TOWER, "model.embed_audio": AUDIO_TOWER}),
    # Early-fusion families with a Linear patch embedding and no vision encoder: that Linear is the bridge
    ModalityMap(("fuyu",), vision=(), projector=("model.vision_embed_tokens",), language=("model.language_model",),
                vision_layers=(), language_layers=("model.language_model.layers",), vision_feature_layer=None),
    ModalityMap(("gemma4_unified",), vision=(), projector=("model.embed_vision",), language=("model.language_model",),
                vision_layers=(), language_layers=("model.language_model.layers",), vision_feature_layer=None,
                default_config_fixes={"vision_config": SUB_CONFIG_DEFAULT},
                excluded={"model.embed_audio": AUDIO_TOWER, "model.audio_tower": AUDIO_TOWER}),
    ModalityMap(("inkling_mm_model",), vision=("model.vision_tower",), projector=(), language=("model.language_model",),
                vision_layers=("model.vision_tower.encoder_layers",), language_layers=("model.language_model.layers",),
                vision_feature_layer=None, excluded={"model.audio_tower": AUDIO_TOWER}),
    # Florence-2: a DaViT vision backbone in 4 stages (blocks.0-3, each a list of blocks), BART encoder-decoder
    ModalityMap(("florence2",), vision=("model.vision_tower",), projector=("model.multi_modal_projector",),
                language=("model.language_model",),
                vision_layers=tuple(f"model.vision_tower.blocks.{i}" for i in range(4)),
                language_layers=("model.language_model.encoder.layers", "model.language_model.decoder.layers"),
                vision_feature_layer=None),
    # Kosmos-2 / 2.5: image_to_text_projection (a dense layer + latent-query cross-attention) is the bridge
    ModalityMap(("kosmos-2",), vision=("vision_model",), projector=("image_to_text_projection",),
                language=("text_model",), vision_layers=("vision_model.model.encoder.layers",),
                language_layers=("text_model.model.layers",), vision_feature_layer=None, image_token=()),
    ModalityMap(("kosmos-2.5",), vision=("vision_model",), projector=("image_to_text_projection",),
                language=("text_model",), vision_layers=("vision_model.encoder.layer",),
                language_layers=("text_model.model.layers",), vision_feature_layer=None, image_token=()),
    ModalityMap(("ovis2",), vision=("model.vision_tower",),
                projector=("model.vision_tower.head_linear", "model.vision_tower.head_norm"),
                language=("model.language_model",), vision_layers=("model.vision_tower.transformer.encoder.layers",),
                language_layers=("model.language_model.layers",)),
    # Video-LLaVA: an image tower and a video tower (vision layers: image tower's, then video tower's)
    ModalityMap(("video_llava",), vision=("model.image_tower", "model.video_tower"),
                projector=("model.multi_modal_projector",), language=("model.language_model",),
                vision_layers=("model.image_tower.encoder.layers", "model.video_tower.encoder.layers"),
                language_layers=("model.language_model.layers",), vision_feature_layer=None),
    # IDEFICS (v1): gated cross-attention layers interleaved with the LLaMA decoder are the bridge
    ModalityMap(("idefics",), vision=("model.vision_model",), projector=("model.gated_cross_attn_layers",),
                language=("model.layers", "model.embed_tokens", "model.norm"),
                vision_layers=("model.vision_model.encoder.layers",), projector_layers=("model.gated_cross_attn_layers",),
                language_layers=("model.layers",), vision_feature_layer=None),
    # Pix2Struct: a patch-projection ViT encoder and a T5-style text decoder; the decoder's cross-attention reads it
    ModalityMap(("pix2struct",), vision=("encoder",), projector=(), language=("decoder",),
                vision_layers=("encoder.encoder.layer",), language_layers=("decoder.layer",),
                vision_feature_layer=None, image_token=()),
    ModalityMap(("pp_formulanet",), vision=("model.encoder",), projector=("model.encoder.multi_modal_projector",),
                language=("model.decoder",), vision_layers=("model.encoder.layers",),
                language_layers=("model.decoder.layers",), vision_feature_layer=None),
    # GIT: CLIP image encoder, a projection, and a BERT-style decoder over [image tokens; text]
    ModalityMap(("git",), vision=("git.image_encoder",), projector=("git.visual_projection",),
                language=("git.encoder", "git.embeddings", "output"),
                vision_layers=("git.image_encoder.vision_model.encoder.layers",), language_layers=("git.encoder.layer",),
                language_extra={"lm_head": "output"}, vision_feature_layer=None, image_token=()),
    ModalityMap(("janus",), vision=("model.vision_model",), projector=("model.aligner",),
                language=("model.language_model",), vision_layers=("model.vision_model.encoder.layers",),
                language_layers=("model.language_model.layers",),
                excluded={"model.generation_aligner": "image-generation path (VQ tokens out), not image understanding",
                          "model.generation_head": "image-generation path (VQ tokens out), not image understanding",
                          "model.vqmodel": "image-generation VQ-VAE"}),
    ModalityMap(("lighton_ocr",), vision=("model.vision_encoder",), projector=("model.vision_projection",),
                language=("model.language_model",), vision_layers=("model.vision_encoder.transformer.layers",),
                language_layers=("model.language_model.layers",)),
    ModalityMap(("minicpm_ocr", "minicpmv4_6", "minicpmv4_7"), vision=("model.vision_tower",),
                projector=("model.vision_tower.vit_merger", "model.merger"), language=("model.language_model",),
                vision_layers=("model.vision_tower.encoder.layers",), language_layers=("model.language_model.layers",)),
    ModalityMap(("hyperclovax_vision_v2",), vision=("model.vision_model",),
                projector=("model.vision_model.merger", "model.projector"), language=("model.language_model",),
                vision_layers=("model.vision_model.blocks",), language_layers=("model.language_model.layers",)),
    ModalityMap(("ernie4_5_vl_moe",), vision=("model.vision_tower",), projector=("model.resampler_model",),
                language=("model.language_model",), vision_layers=("model.vision_tower.blocks",),
                language_layers=("model.language_model.layers",)),
    ModalityMap(("muse_glimmer", "muse_spark"), vision=("model.vision_tower",),
                projector=("model.vision_adapter", "model.vision_projection"), language=("model.language_model",),
                vision_layers=("model.vision_tower.layers",), language_layers=("model.language_model.layers",),
                excluded={"model.audio_tower": AUDIO_TOWER}),
    ModalityMap(("unlimited_ocr",), vision=("model.vision_tower",), projector=("model.multi_modal_projector",),
                language=("model.language_model",),
                vision_layers=("model.vision_tower.sam_encoder.layers", "model.vision_tower.vision_encoder.encoder.layers"),
                language_layers=("model.language_model.layers",), vision_feature_layer=None),
    ModalityMap(("t5gemma2",), vision=("model.encoder.vision_tower",), projector=(),
                language=("model.encoder.text_model", "model.decoder", "lm_head"),
                vision_layers=("model.encoder.vision_tower.encoder.layers",),
                language_layers=("model.encoder.text_model.layers", "model.decoder.layers"),
                language_extra={"lm_head": "lm_head.out_proj"}, vision_feature_layer=None,
                excluded={"model.encoder.vision_tower.head": UNUSED_POOLING_HEAD}),
    # pi0: a PaliGemma VLM plus an action expert; mmtuning adapts the VLM, never the action model
    ModalityMap(("pi0",), vision=("model.vlm.vision_tower",), projector=("model.vlm.multi_modal_projector",),
                language=("model.vlm.language_model",), vision_layers=("model.vlm.vision_tower.encoder.layers",),
                language_layers=("model.vlm.language_model.layers",),
                excluded={"model.dit": "action expert (robot actions, not text)",
                          "embed_action_time": "action/state embedding of the action expert",
                          "action_out_proj": "action head of the action expert"}),
    # new in transformers 5.24
    ModalityMap(("hy_v4_vl",), vision=("model.vision_tower",), projector=(), language=("model.language_model",),
                vision_layers=("model.vision_tower.layers",), language_layers=("model.language_model.layers",),
                vision_feature_layer=None),
    Refusal(("apertus1p5",), "early fusion: a VQ image tokenizer turns images into discrete tokens of the language "
                             "model's vocabulary, so there is no vision encoder or projector to adapt (train it as "
                             "a language model)"),
    Refusal(("udop",), "early fusion: image patches and text tokens go through one shared T5 encoder stack, so "
                       "there is no separable vision encoder to adapt (train it as a language model)"),
    # The generic encoder-decoder wrapper (TrOCR-style): stacks chosen by the encoder's and decoder's model types.
    # Pairs outside these tables are refused by name (register a map for yours); the decoder's cross-attention
    # reads the encoder, so there is no projector unless the widths differ (`enc_to_dec_proj`, not adapted).
    ModalityMap(("vision-encoder-decoder",), vision=("encoder",), projector=(), language=("decoder",),
                vision_layers=("encoder.layers",), language_layers=("decoder.bert.encoder.layer",),
                vision_layers_by_vision_model={"vit": ("encoder.layers",)},
                language_layers_by_text_model={"bert": ("decoder.bert.encoder.layer",),
                                               "trocr": ("decoder.model.decoder.layers",)},
                language_extra={"lm_head": "decoder.cls.predictions.decoder"}, vision_feature_layer=None,
                excluded={"encoder.pooler": "the ViT pooler: its output never reaches the decoder",
                          "decoder.cls.predictions.transform": "BERT's MLM prediction transform before the output "
                          "projection", "enc_to_dec_proj": "width adapter between encoder and decoder"}),
    Refusal(("mistral4",), "transformers builds it without any vision part (its config has no vision_config): "
                           "nothing to split"),
)
BUILTIN_MAPS: tuple[ModalityMap | Refusal, ...] = _LLAVA_QWEN_IDEFICS_MLLAMA_MAPS + _BRIDGED_AND_OTHER_MAPS


@hookimpl
def register_architectures(register):
    for modality_map in BUILTIN_MAPS:
        register(modality_map)
