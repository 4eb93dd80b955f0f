"""How well the modality maps cover the installed transformers: every image-text-to-text model type, built on
the meta device from its default config, checked against an oracle that does not use the maps.

The oracle is transformers' own composition: a VLM builds its vision tower, its language model (and its audio
tower, Q-Former, ...) from the sub-configs of its config, so a sub-model whose `config` is `vision_config` is
vision, one built from `text_config` is language. A resolved layout is correct when every Linear module sits in
a modality the oracle allows there and no Linear is left out except under the map's `excluded` prefixes. The
test suite (tests/test_coverage.py) and docs/architectures.md (docgen) both read `survey()`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import MMTuningError
from . import LAYER_LEAF_TYPES, ModalityMap, Refusal, apply_config_fixes, registered, resolve_layout

# Oracle regions, from the name of the sub-config a sub-model was built from, and the modalities allowed there.
# A vision tower may hold its projector (Qwen-VL's merger, Llama 4's vision adapter); a Q-Former / perceiver is
# the bridge; Linear modules outside any sub-model (a top-level projector, lm_head) may be anything but must
# be covered; audio towers are never vision or language.
REGION_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("audio", ("audio", "speech")),
    ("bridge", ("qformer", "perceiver", "adapter")),
    ("language", ("text", "language", "llm", "decoder")),
    ("vision", ("vision", "visual", "image", "sam", "encoder", "vq")),
)
ALLOWED: dict[str, frozenset[str]] = {
    "vision": frozenset({"vision", "projector"}),
    "language": frozenset({"language"}),
    "bridge": frozenset({"projector"}),
    "audio": frozenset(),
    "other": frozenset({"vision", "projector", "language"}),
}

STATUSES = ("resolved", "refused", "incomplete", "unbuildable")


@dataclass(frozen=True)
class Coverage:
    """One model type's result: status, why (refusal / build error / the first problems), and by which map."""

    model_type: str
    status: str  # resolved | refused | incomplete | unbuildable
    reason: str = ""
    source: str = ""  # builtin | detected | a plugin name
    counts: tuple[tuple[str, int], ...] = ()  # (modality, layers)
    modality_map: ModalityMap | None = field(default=None, compare=False)


def _sub_configs(config: Any, base: str = "") -> list[tuple[str, Any]]:
    from transformers import PretrainedConfig

    found = []
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            found.append((base + key, value))
            found += _sub_configs(value, base + key + ".")
    return found


def _region(key: str) -> str:
    last = key.rsplit(".", 1)[-1].lower()
    for region, words in REGION_WORDS:
        if any(word in last for word in words):
            return region
    return "other"


def oracle_regions(model: nn.Module) -> dict[str, str]:
    """Full name -> oracle region of every adaptable Linear (region of its innermost sub-model)."""
    from transformers import PreTrainedModel

    subs = _sub_configs(model.config)
    owners: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, PreTrainedModel) or module.config is model.config:
            continue
        key = next((k for k, c in subs if c is module.config), None)
        if key is None:
            key = next((k for k, c in subs if type(c) is type(module.config)), "")
        owners.append((name, _region(key) if key else "other"))
    regions = {}
    for name, module in model.named_modules():
        if isinstance(module, LAYER_LEAF_TYPES):
            inside = [(len(p), r) for p, r in owners if name.startswith(p + ".")]
            regions[name] = max(inside)[1] if inside else "other"
    return regions


def coverage_problems(model: nn.Module, modality_map: ModalityMap | None = None) -> list[str]:
    """What a resolved layout gets wrong against the oracle (empty: correct)."""
    layout = resolve_layout(model, modality_map)
    placed = {leaf.name: leaf.modality for leaf in layout.leaves}
    excluded = tuple(layout.modality_map.excluded)
    problems = []
    for name, region in oracle_regions(model).items():
        modality = placed.get(name)
        if any(name == p or name.startswith(p + ".") for p in excluded):
            if modality is not None:
                problems.append(f"{name}: excluded but placed as {modality}")
        elif region == "audio":
            problems.append(f"{name}: in an audio tower, not excluded" + (f" (placed as {modality})" if modality else ""))
        elif modality is None:
            problems.append(f"{name}: no modality covers it ({region} sub-model)")
        elif modality not in ALLOWED[region]:
            problems.append(f"{name}: placed as {modality} inside a {region} sub-model")
    return problems


def default_skeleton(model_type: str) -> nn.Module:
    """The meta-device model of `model_type` from its default config (a map's config fixes applied)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    entry = registered().get(model_type)
    fixes = entry.default_config_fixes if isinstance(entry, ModalityMap) else {}
    config = apply_config_fixes(AutoConfig.for_model(model_type), fixes)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def build_failure(error: Exception) -> str:
    """Why transformers could not build a default config, in a table-cell phrase."""
    text = " ".join(str(error).split())
    if "timm" in text:
        return "needs timm (vision tower is a TimmWrapperModel)"
    return f"default config cannot be built: {type(error).__name__}: {text[:120]}"


@functools.lru_cache(maxsize=None)
def survey(model_type: str) -> Coverage:
    """Build, resolve and check one model type (cached: the coverage test and docgen share one pass)."""
    entry = registered().get(model_type)
    if isinstance(entry, Refusal):
        return Coverage(model_type, "refused", entry.reason, entry.source)
    try:
        model = default_skeleton(model_type)
    except Exception as error:  # transformers raises anything from a broken default config
        return Coverage(model_type, "unbuildable", build_failure(error))
    try:
        layout = resolve_layout(model)
    except MMTuningError as error:
        return Coverage(model_type, "refused", str(error).split(". ")[0], "detected")
    problems = coverage_problems(model, layout.modality_map)
    source = "detected" if layout.detected else layout.modality_map.source
    counts = tuple((m, n) for m, n in layout.layer_counts.items() if n)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return Coverage(model_type, "incomplete", "; ".join(problems[:3]) + more, source, counts, layout.modality_map)
    return Coverage(model_type, "resolved", "", source, counts, layout.modality_map)


def image_text_types() -> list[str]:
    """Every model type of the installed transformers' image-text-to-text auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


if __name__ == "__main__":  # python -m mmtuning_plugin.arch.coverage [TYPE ...]: the table, one line per type
    import sys
    from collections import Counter

    results = [survey(t) for t in (sys.argv[1:] or image_text_types())]
    for result in results:
        print(f"{result.model_type:24} {result.status:11} {result.source:9} {result.reason[:300]}", flush=True)
    print(dict(Counter(r.status for r in results)))
