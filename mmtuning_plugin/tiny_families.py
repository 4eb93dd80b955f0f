"""Tiny random models of the bridged families (BLIP-2, InstructBLIP with OPT or Flan-T5; Llama 4; Kosmos-2)
and matching batches, for forward/backward tests with adapters on every modality.

Separate from tiny.py because these configs nest three sub-configs (vision, Q-Former, any language model) that
the generic shrink does not reach: each is written out here, sizes as facts.
"""

from __future__ import annotations

from typing import Any

import torch

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
# (model type, language model) pairs the test suite trains end to end
FAMILY_CASES: tuple[tuple[str, str | None], ...] = (
    ("blip-2", "opt"), ("blip-2", "t5"), ("instructblip", "opt"), ("instructblip", "t5"),
)


def tiny_family_config(model_type: str, text: str | None = None):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    if model_type in QFORMER_TYPES:
        return type(base)(vision_config=_VISION, qformer_config=_QFORMER, text_config=_TEXT[text or "opt"],
                          num_query_tokens=QUERY_TOKENS, image_token_index=IMAGE_TOKEN)
    raise KeyError(f"no tiny config for {model_type}")


def tiny_family_model(model_type: str, text: str | None = None, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_family_config(model_type, text), dtype=dtype)
    return model.eval()


def tiny_family_batch(model, batch: int = 2, text_len: int = 8, with_labels: bool = True) -> TinyBatch:
    """Pixel values plus `num_query_tokens` image tokens in front of random text (InstructBLIP: also the
    instruction the Q-Former reads)."""
    generator = torch.Generator().manual_seed(1)
    config = model.config
    size = config.vision_config.image_size
    ids = torch.cat([torch.full((batch, QUERY_TOKENS), IMAGE_TOKEN),
                     torch.randint(5, 290, (batch, text_len), generator=generator)], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    if config.model_type == "instructblip":
        inputs["qformer_input_ids"] = torch.randint(5, 290, (batch, 6), generator=generator)
        inputs["qformer_attention_mask"] = torch.ones(batch, 6, dtype=torch.long)
    if with_labels:
        inputs["labels"] = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return TinyBatch(inputs, IMAGE_TOKEN, QUERY_TOKENS)
