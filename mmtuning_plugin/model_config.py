"""Reading and editing a transformers model config by dotted path (`text_config.pad_token_id`).

Architecture facts name config entries this way (a map's `default_config_fixes`, `cross_attention_layers`);
loading, quantization, losses and the tiny test builders all read them through these helpers.
"""

from __future__ import annotations

from typing import Any


def set_dotted(config: Any, dotted: str, value: Any) -> None:
    """`set_dotted(config, "text_config.pad_token_id", 0)`; every parent must exist."""
    *parents, leaf = dotted.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


def get_dotted(config: Any, dotted: str) -> Any:
    """The value at a dotted path, or None where any part is missing."""
    for part in dotted.split("."):
        config = getattr(config, part, None)
    return config


def image_token_id(config: Any) -> int:
    """The id of the image placeholder token (`image_token_id` or, in older configs, `image_token_index`)."""
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no image token id")
