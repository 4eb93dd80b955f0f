"""Reading and editing a transformers model config by dotted path (`text_config.pad_token_id`).

Architecture facts name config entries this way (a map's `default_config_fixes`, `cross_attention_layers`);
loading, quantization and the tiny test builders read them through these helpers.
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

