"""Quantization policies per modality (issue 3 fills this in; hosts already call `bnb_config_kwargs`)."""

from __future__ import annotations

from typing import Any


def bnb_config_kwargs(config: Any, model_config: Any) -> dict[str, Any] | None:
    """kwargs for `transformers.BitsAndBytesConfig` under this config's policy; None when it sets none."""
    return None
