"""The `quant:` policy of a run: read from a config, a preset name or a block (the schema is config.QuantPolicy)."""

from __future__ import annotations

from typing import Any

from ..config import QuantPolicy, validation_lines
from ..errors import MMTuningError


def policy_of(config: Any) -> QuantPolicy | None:
    """The policy of a MMTuningConfig, a QuantPolicy, a preset name, or None."""
    if config is None or isinstance(config, QuantPolicy):
        return config
    if isinstance(config, (str, dict)):
        return load_policy(config)
    return getattr(config, "quant", None)


def load_policy(value: Any, where: str = "mmtuning.quant") -> QuantPolicy:
    from pydantic import ValidationError

    try:
        return QuantPolicy.model_validate(value)
    except ValidationError as error:
        lines = validation_lines(error, where, valid=lambda loc: list(QuantPolicy.model_fields))
        raise MMTuningError("Invalid quantization settings:\n  " + "\n  ".join(lines)) from None
