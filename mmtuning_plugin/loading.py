"""Turn what a user types as MODEL (a directory, a cached hub id, a bare model type) into a model.

`inspect-targets` only needs module names and shapes, so models are built on the meta device from
their config: no weights, no download, seconds even for 70B layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import MMTuningError


def load_model_config(model: str):
    """A transformers config from a local dir, an offline-cached hub id, or a bare model type."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model).expanduser()
    if path.is_file():
        instead = f"its directory, {path.parent}" if path.name == "config.json" else "the model directory that holds config.json"
        raise MMTuningError(f"'{model}' is a file, but MODEL is a model directory (with config.json), a cached hub id "
                            f"or a model type; pass {instead}.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MMTuningError(f"'{model}' is a directory without a config.json; point MODEL at a model "
                                f"directory (one with config.json), a cached hub id, or a model type such as qwen2_5_vl.")
        return _local_config(path)
    if path.suffix == ".json" or model.startswith((".", "~", os.sep)) or model.count("/") > 1:
        raise MMTuningError(f"'{model}' does not exist. MODEL is a model directory, a hub id already in the local "
                            f"cache (e.g. Qwen/Qwen2.5-VL-7B-Instruct), or a model type such as qwen2_5_vl.")
    if model in CONFIG_MAPPING:
        return _default_config(model)
    if "/" in model:
        try:
            return AutoConfig.from_pretrained(model, local_files_only=True)
        except Exception:
            raise MMTuningError(
                f"'{model}' is not in the local Hugging Face cache and mmtuning never downloads. Download it once "
                f"(`hf download {model} config.json`), pass its local directory, or pass a model type such as "
                f"qwen2_5_vl to inspect the default layout."
            ) from None
    raise MMTuningError(
        f"Unknown model '{model}': not a directory, not a cached hub id and not a transformers model type. "
        f"Vision-language model types include: {', '.join(_vlm_types()[:12])}, ... (`mmtune architectures` lists them)."
    )


def _local_config(path: Path):
    """config.json of a model directory; a bad file, a missing or unknown model_type each get their own answer."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .files import read_json_object

    config_path = path / "config.json"
    data = read_json_object(config_path, str(config_path), "the model's config.json (re-download it)")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise MMTuningError(f"{config_path} has no `model_type`, so transformers cannot tell which model it describes; "
                            f"restore the model's own config.json (it names e.g. \"model_type\": \"llava\").")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise MMTuningError(
            f"{config_path}: model_type '{model_type}' is unknown to transformers {transformers.__version__} (the JSON "
            f"itself is fine). Use a transformers release that has it, or register it: its config and model classes "
            f"with AutoConfig.register / AutoModelForImageTextToText.register, and its modality map through an mmtuning "
            f"plugin (`register_architectures`, see docs/extending.md).")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types for values its config class refuses
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise MMTuningError(f"transformers could not read {config_path} as a {model_type} config: {first}. Fix the "
                            f"value it names or re-download the file.") from None


def _default_config(model_type: str):
    from transformers import AutoConfig

    from .arch import apply_config_fixes, registered_maps

    known = registered_maps().get(model_type)
    return apply_config_fixes(AutoConfig.for_model(model_type), known.default_config_fixes if known else {})


def _vlm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .arch import registered_maps

    known = list(registered_maps())
    return known + sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - set(known))


def build_skeleton(config: Any) -> torch.nn.Module:
    """The model's module tree on the meta device (no memory for weights)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise MMTuningError(f"Model type '{config.model_type}' is not an image-text-to-text model in this "
                            f"transformers; mmtuning adapts vision-language models (e.g. {', '.join(_vlm_types()[:6])}).")
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config)
    except Exception as error:
        raise MMTuningError(f"transformers could not build '{config.model_type}' from its config: {error}") from None


def load_skeleton(model: str) -> torch.nn.Module:
    return build_skeleton(load_model_config(model))
