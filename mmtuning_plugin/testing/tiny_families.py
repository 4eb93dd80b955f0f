"""Tiny random models of the bridged families (BLIP-2, InstructBLIP with OPT or Flan-T5; Llama 4; Kosmos-2;
Florence-2; Gemma 4 with its vision tower) and matching batches, for forward/backward tests with adapters on every modality.

Separate from tiny.py because these configs nest three sub-configs (vision, Q-Former, any language model) that
the generic shrink does not reach: each is written out here, sizes as facts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base_view import cpu_4bit_repack_off
from .tiny import TinyBatch

IMAGE_TOKEN = 300
QUERY_TOKENS = 4
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
               patch_size=8)
_QFORMER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                encoder_hidden_size=32, vocab_size=320)
# Language models BLIP-2 / InstructBLIP checkpoints pair with: OPT (decoder-only), Flan-T5 (encoder-decoder).
_TEXT: dict[str, dict[str, Any]] = {
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=4,
                num_attention_heads=4, vocab_size=320, max_position_embeddings=512, pad_token_id=1),
    "t5": dict(model_type="t5", d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
               vocab_size=320, decoder_start_token_id=0, pad_token_id=0),
}
QFORMER_TYPES = ("blip-2", "instructblip")
# Whole configs (sub-configs as dicts) of the other families. Llama 4's pixel shuffle (ratio 0.5) makes the
# adapter's input 4x the vision width, which its `intermediate_size` must equal (1408 x 4 = 5632 in Scout).
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama4": dict(
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64, pixel_shuffle_ratio=0.5),
        text_config=dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                         num_experts_per_tok=1, interleave_moe_layer_step=2, vocab_size=320, pad_token_id=0,
                         attention_chunk_size=64, max_position_embeddings=512),
        image_token_index=IMAGE_TOKEN),
    "kosmos-2": dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(embed_dim=64, ffn_dim=128, layers=4, attention_heads=4, vocab_size=320,
                         max_position_embeddings=512, pad_token_id=1),
        latent_query_num=QUERY_TOKENS),
    # DaViT keeps its 4 stages (the map names blocks.0-3); BART encoder and decoder 2 layers each
    "florence2": dict(
        vision_config=dict(depths=[1, 1, 2, 1], embed_dim=[16, 16, 32, 32], num_heads=[2, 2, 4, 4],
                           num_groups=[2, 2, 4, 4], window_size=2, projection_dim=64, drop_path_rate=0.0),
        text_config=dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=320,
                         max_position_embeddings=512),
        image_token_id=IMAGE_TOKEN),
    # Gemma 4: pre-patched pixels (patch 4 -> 48 values) pooled 3x3 into soft tokens; no per-layer head_dim overrides
    "gemma4": dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, patch_size=4, position_embedding_size=64,
                           pooling_kernel_size=3),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=320, vocab_size_per_layer_input=320,
                         hidden_size_per_layer_input=16, per_layer_config={}, sliding_window=64,
                         layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=512,
                         pad_token_id=0),
        image_token_id=IMAGE_TOKEN, boi_token_id=301, eoi_token_id=302, video_token_id=303, audio_token_id=304,
        boa_token_id=305, eoa_token_index=306),
}
_IMAGE_SIZE = {"florence2": 64}
GEMMA4_GRID = 6  # 6x6 patches, pooled 3x3 -> 4 image tokens
# (model type, language model) pairs the test suite trains end to end
FAMILY_CASES: tuple[tuple[str, str | None], ...] = (
    ("blip-2", "opt"), ("blip-2", "t5"), ("instructblip", "opt"), ("instructblip", "t5"),
    ("llama4", None), ("kosmos-2", None), ("florence2", None), ("gemma4", None),
)


def tiny_family_config(model_type: str, text: str | None = None):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    if model_type in QFORMER_TYPES:
        return type(base)(vision_config=_VISION, qformer_config=_QFORMER, text_config=_TEXT[text or "opt"],
                          num_query_tokens=QUERY_TOKENS, image_token_index=IMAGE_TOKEN)
    return type(base)(**_CONFIGS[model_type])


def tiny_family_model(model_type: str, text: str | None = None, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_family_config(model_type, text), dtype=dtype)
    return model.eval()


def _image_tokens(model, pixels: torch.Tensor) -> int:
    """Image tokens per sample, measured from the model itself (Llama 4 and Florence-2 pool and shuffle)."""
    config = model.config
    if config.model_type in QFORMER_TYPES:
        return QUERY_TOKENS
    if config.model_type == "kosmos-2":
        return config.latent_query_num
    if config.model_type == "gemma4":
        return GEMMA4_GRID**2 // config.vision_config.pooling_kernel_size**2
    inner = getattr(model, "model", model) if hasattr(getattr(model, "model", None), "get_image_features") else model
    with torch.no_grad(), cpu_4bit_repack_off(model):  # a 4-bit tower in eval mode: see base_view
        features = inner.get_image_features(pixel_values=pixels[:1])
    if not torch.is_tensor(features):
        features = features.pooler_output if features.pooler_output is not None else features.last_hidden_state
    return features.reshape(-1, features.shape[-1]).shape[0]


def tiny_family_batch(model, batch: int = 2, text_len: int = 8, with_labels: bool = True) -> TinyBatch:
    """Pixel values plus the model's number of image tokens after two text tokens, then random text
    (InstructBLIP: also the instruction the Q-Former reads; Kosmos-2: the image-embedding position mask)."""
    generator = torch.Generator().manual_seed(1)
    config = model.config
    size = _IMAGE_SIZE.get(config.model_type, getattr(config.vision_config, "image_size", 32))
    extra: dict[str, torch.Tensor] = {}
    if config.model_type == "gemma4":  # patches in [0, 1] with their (x, y) grid positions
        pixels = torch.rand(batch, GEMMA4_GRID**2, 3 * config.vision_config.patch_size**2, generator=generator)
        grid = torch.arange(GEMMA4_GRID)
        positions = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
        extra["image_position_ids"] = positions.unsqueeze(0).repeat(batch, 1, 1)
    else:
        pixels = torch.randn(batch, 3, size, size, generator=generator)
    count = _image_tokens(model, pixels)
    image = 5 if config.model_type == "kosmos-2" else IMAGE_TOKEN  # Kosmos-2 marks positions with a mask instead
    ids = torch.cat([torch.full((batch, 2), 2), torch.full((batch, count), image),
                     torch.randint(6, 290, (batch, text_len), generator=generator)], dim=1)
    image_positions = torch.zeros_like(ids)
    image_positions[:, 2:2 + count] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, **extra}
    if config.model_type == "instructblip":
        inputs["qformer_input_ids"] = torch.randint(5, 290, (batch, 6), generator=generator)
        inputs["qformer_attention_mask"] = torch.ones(batch, 6, dtype=torch.long)
    if config.model_type == "kosmos-2":
        inputs["image_embeds_position_mask"] = image_positions
    if with_labels:
        inputs["labels"] = ids.masked_fill(image_positions.bool(), -100)
    return TinyBatch(inputs, image, count)
