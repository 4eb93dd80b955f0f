"""Tiny random vision-language models built from the real transformers config classes.

Tests, benchmarks and the demo need real architectures without downloads: these builders shrink a
model type's default config (every size field we know of) and build random weights, plus a matching
batch (pixel values, image tokens, labels) so a forward and backward pass runs on CPU in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..arch import image_token_id
from ..base_view import cpu_4bit_repack_off
from ..model_config import set_dotted

# Size fields shrunk in every sub-config that has them. Tiny but structurally faithful: at least
# 4 layers so layer selections (top/bottom/ranges) mean something.
TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 320,
    "max_position_embeddings": 512,
    "sliding_window": 64,
    "query_pre_attn_scalar": 16,
}
VISION_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "attention_heads": 4,
    "num_heads": 4,
    "head_dim": 8,
    "image_size": 32,
    "patch_size": 8,
    # Qwen-style vision configs
    "depth": 4,
    "embed_dim": 32,
    "mlp_ratio": 2,
    "num_position_embeddings": 64,
}

# Per model type: config overrides (dotted keys) applied after the generic shrink. Facts, not code.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llava": {"image_token_index": 300, "image_seq_length": 16},
    "llava_next": {"image_token_index": 300, "image_grid_pinpoints": [[32, 32]]},
    "llava_onevision": {"image_token_index": 300, "video_token_index": 301, "image_grid_pinpoints": [[32, 32]]},
    "paligemma": {"image_token_index": 300, "text_config.num_image_tokens": 16, "vision_config.projection_dim": 64,
                  "projection_dim": 64, "hidden_size": 64, "vocab_size": 320},
    "gemma3": {"image_token_index": 300, "boi_token_index": 301, "eoi_token_index": 302, "mm_tokens_per_image": 4,
               "text_config.layer_types": None},
    "mistral3": {"image_token_index": 300, "spatial_merge_size": 2, "vision_config.head_dim": 8},
    "aya_vision": {"image_token_index": 300, "downsample_factor": 2, "text_config.layer_types": None},
    "internvl": {"image_token_id": 300, "image_seq_length": 4, "vision_config.image_size": [32, 32],
                 "vision_config.patch_size": [8, 8], "text_config.layer_types": None},
    # pad id 0 inside the tiny vocab: transformers 5.6 defaults it to 128002 (5.23: None)
    "idefics3": {"image_token_id": 300, "scale_factor": 2, "vision_config.image_size": 32, "text_config.pad_token_id": 0},
    "smolvlm": {"image_token_id": 300, "scale_factor": 2, "vision_config.image_size": 32, "text_config.pad_token_id": 0},
    "qwen2_vl": {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302,
                 "vision_end_token_id": 303, "vision_config.hidden_size": 64, "vision_config.patch_size": 4,
                 "vision_config.spatial_merge_size": 2, "text_config.layer_types": None,
                 "text_config.rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "rope_theta": 10000.0}},
    "qwen2_5_vl": {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302,
                   "vision_end_token_id": 303, "vision_config.out_hidden_size": 64, "vision_config.patch_size": 4,
                   "vision_config.fullatt_block_indexes": [1, 3], "vision_config.window_size": 16,
                   "vision_config.spatial_merge_size": 2, "text_config.layer_types": None,
                   "text_config.rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                   "rope_theta": 10000.0}},
    "qwen3_vl": {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302,
                 "vision_end_token_id": 303, "vision_config.out_hidden_size": 64, "vision_config.patch_size": 4,
                 "vision_config.deepstack_visual_indexes": [1, 2], "vision_config.spatial_merge_size": 2,
                 "text_config.rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "mrope_interleaved": True, "rope_theta": 10000.0}},
    "mllama": {"image_token_index": 300, "text_config.cross_attention_layers": [1, 3],
               "text_config.vocab_size": 320, "text_config.pad_token_id": 0, "vision_config.num_global_layers": 2,
               "vision_config.intermediate_layers_indices": [1, 3], "vision_config.vision_output_dim": 96,
               "vision_config.max_num_tiles": 1, "vision_config.supported_aspect_ratios": [[1, 1]],
               "vision_config.image_size": 32},
}


def _shrink(sub_config: Any, sizes: dict[str, Any]) -> None:
    present = sub_config.to_dict()
    for key, value in sizes.items():
        if key in present:
            setattr(sub_config, key, value)


def tiny_config(model_type: str, **overrides: Any):
    """A real config object of `model_type` with tiny sizes (random weights, CPU-friendly)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config.text_config, TEXT_SIZES)
    _shrink(config.vision_config, VISION_SIZES)
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = None  # re-derived from num_hidden_layers below
    for dotted, value in {**TINY_OVERRIDES.get(model_type, {}), **overrides}.items():
        set_dotted(config, dotted, value)
    text = config.text_config
    if hasattr(text, "layer_types") and text.layer_types is None and "layer_types" in type(text)().to_dict():
        text.layer_types = ["full_attention"] * text.num_hidden_layers
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Random-weight model of `model_type` built from `tiny_config` (eval mode, CPU)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    _randomize_zero_matrices(model)
    return model.eval()


def _randomize_zero_matrices(model: torch.nn.Module) -> None:
    """Some inits are zeros (Gemma 3's projector weight, Mllama's cross-attention gates): with them the
    images could not reach the loss of a random model. Biases may stay zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("bias") and not param.any():
                param.normal_(0.0, 0.02)


@dataclass
class TinyBatch:
    """Inputs for one forward pass plus the facts tests assert on."""

    inputs: dict[str, torch.Tensor]
    image_token_id: int
    num_image_tokens: int


def _text_around(image_tokens: torch.Tensor, image_id: int, vocab: int, text_len: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        text = torch.randint(5, min(vocab, 290), (text_len,), generator=generator)
        rows.append(torch.cat([text[:2], image_tokens, text[2:]]))
    return torch.stack(rows)


def _count_features(model, **vision_inputs) -> int:
    with torch.no_grad(), cpu_4bit_repack_off(model):  # a 4-bit tower in eval mode: see base_view
        features = model.model.get_image_features(**vision_inputs)
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    if isinstance(features, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    return features.reshape(-1, features.shape[-1]).shape[0]


def _pixel_batch(model, batch: int):
    vision = model.config.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, list) else vision.image_size
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, size, size, generator=generator)


def _llava_like(model, batch: int, text_len: int) -> TinyBatch:
    """One image per sample: pixel_values (B,3,H,W); image-token count measured from the model itself."""
    config = model.config
    pixels = _pixel_batch(model, batch)
    extra: dict[str, torch.Tensor] = {}
    if config.model_type in ("llava_next", "llava_onevision"):
        size = pixels.shape[-1]
        extra["image_sizes"] = torch.tensor([[size, size]] * batch)
        # base image + one high-res tile for the single 32x32 grid pinpoint
        pixels = pixels.unsqueeze(1).repeat(1, 2, 1, 1, 1)
    if config.model_type == "mistral3":
        extra["image_sizes"] = torch.tensor([[pixels.shape[-2], pixels.shape[-1]]] * batch)
    per_sample = _count_features(model, pixel_values=pixels[:1], **{k: v[:1] for k, v in extra.items()})
    image_id = image_token_id(config)
    ids = _text_around(torch.full((per_sample,), image_id), image_id, config.text_config.vocab_size, text_len, batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, **extra}
    if config.model_type == "gemma3":
        inputs["token_type_ids"] = (ids == image_id).long()
    if config.model_type == "paligemma":
        inputs["token_type_ids"] = (ids == image_id).long()
    return TinyBatch(inputs, image_id, per_sample)


def _idefics_like(model, batch: int, text_len: int) -> TinyBatch:
    pixels = _pixel_batch(model, batch).unsqueeze(1)  # (B, images=1, 3, H, W)
    per_sample = _count_features(model, pixel_values=pixels[:1])
    image_id = image_token_id(model.config)
    ids = _text_around(torch.full((per_sample,), image_id), image_id, model.config.text_config.vocab_size, text_len, batch)
    return TinyBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, image_id, per_sample)


def _qwen_like(model, batch: int, text_len: int) -> TinyBatch:
    """Qwen-VL takes flattened patches plus a (t, h, w) grid per image."""
    vision = model.config.vision_config
    grid_t, grid_h, grid_w = 1, 4, 4
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(batch * grid_t * grid_h * grid_w, patch_dim, generator=generator)
    grid = torch.tensor([[grid_t, grid_h, grid_w]] * batch)
    per_sample = grid_t * grid_h * grid_w // vision.spatial_merge_size**2
    image_id = image_token_id(model.config)
    ids = _text_around(torch.full((per_sample,), image_id), image_id, model.config.text_config.vocab_size, text_len, batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
              "image_grid_thw": grid, "mm_token_type_ids": (ids == image_id).long()}
    return TinyBatch(inputs, image_id, per_sample)


def _mllama(model, batch: int, text_len: int) -> TinyBatch:
    """Mllama: tiles, aspect ratios and a cross-attention mask instead of image tokens in the sequence."""
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(batch, 1, 1, 3, vision.image_size, vision.image_size, generator=generator)
    image_id = image_token_id(model.config)
    ids = _text_around(torch.tensor([image_id]), image_id, model.config.text_config.vocab_size, text_len, batch)
    cross_mask = torch.ones(batch, ids.shape[1], 1, 1, dtype=torch.long)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(batch, 1, 1, dtype=torch.long),
        "cross_attention_mask": cross_mask,
    }
    return TinyBatch(inputs, image_id, 1)


BATCH_BUILDERS: dict[str, Callable[..., TinyBatch]] = {
    "idefics3": _idefics_like,
    "smolvlm": _idefics_like,
    "qwen2_vl": _qwen_like,
    "qwen2_5_vl": _qwen_like,
    "qwen3_vl": _qwen_like,
    "mllama": _mllama,
}


def tiny_batch(model, batch: int = 2, text_len: int = 8, with_labels: bool = True) -> TinyBatch:
    """A batch the model accepts: images, matching image tokens, random text and (optionally) labels."""
    builder = BATCH_BUILDERS.get(model.config.model_type, _llava_like)
    result = builder(model, batch, text_len)
    if with_labels:
        labels = result.inputs["input_ids"].clone()
        labels[labels == result.image_token_id] = -100
        result.inputs["labels"] = labels
    return result


# The architectures the test-suite exercises end to end (forward + backward on CPU).
TINY_MODEL_TYPES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "mistral3",
    "mllama",
    "internvl",
    "aya_vision",
)


class RepeatedBatch(torch.utils.data.Dataset):
    """The rows of one batch, repeated to `length` items: a training loss that cannot go down on it means
    nothing trains. Pair with `stack_rows` as the Trainer's data collator."""

    def __init__(self, inputs: dict[str, torch.Tensor], length: int | None = None):
        self.inputs = inputs
        self.rows = inputs["input_ids"].shape[0]
        self.length = length or self.rows

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index % self.rows] for key, value in self.inputs.items()}


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Data collator for `RepeatedBatch` items."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
