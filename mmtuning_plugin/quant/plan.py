"""Which modules a policy quantizes: every Linear transformers would replace, split into 4-bit (or 8-bit) and
kept-16-bit with reasons, and the anchored `llm_int8_skip_modules` list (transformers 5.20+ matches entries
with `re.match` at a module boundary or `endswith`; a bare `vision_tower` does not match
`model.vision_tower...`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..arch import ModelLayout, numbered_blocks, resolve_layout, unwrap
from ..config import QuantPolicy
from ..errors import MMTuningError
from ..model_config import get_dotted
from ..names import is_adapter_child, modality_by_map, module_of
from .bnb import bnb_kwargs_for_plan
from .policy import policy_of

if TYPE_CHECKING:  # pragma: no cover
    from ..config import MMTuningConfig


@dataclass
class QuantPlan:
    """Every Linear transformers would quantize, split into 4-bit (or 8-bit) and kept-16-bit, with reasons."""

    policy: QuantPolicy
    modality: dict[str, str]  # Linear name -> vision | projector | language
    quantized: list[str]
    kept: dict[str, str]  # name -> why it stays 16-bit
    skip_modules: list[str] = field(default_factory=list)

    def quantized_of(self, modality: str) -> list[str]:
        return [n for n in self.quantized if self.modality[n] == modality]

    def kept_of(self, modality: str) -> list[str]:
        return [n for n in self.kept if self.modality[n] == modality]


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> Linear for every module bitsandbytes replaces (or already replaced), PEFT wrappers seen through."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if is_adapter_child(name):
            continue
        name = module_of(name)  # PEFT's ModulesToSaveWrapper keeps the original under `.original_module`
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            module = base
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[name] = module
    return found


def plan_quantization(model: nn.Module, policy: QuantPolicy, layout: ModelLayout | None = None) -> QuantPlan:
    """Decide, for every quantizable Linear of `model` (a meta skeleton or a loaded model), 4-bit or 16-bit."""
    layout = layout or resolve_layout(model)
    mmap = layout.modality_map
    linears = quantizable_linears(model)
    rules = _keep_rules(unwrap(model), layout, policy)
    used_patterns: set[str] = set()
    modality_of: dict[str, str] = {}
    quantized: list[str] = []
    kept: dict[str, str] = {}
    output_name = _output_embedding_name(model)
    for name in linears:
        modality = modality_by_map(name, mmap) or "language"
        modality_of[name] = modality
        reason = None
        if name == output_name:
            reason = "output head (lm_head) is never quantized"
        elif policy.precisions()[modality] == "none":
            reason = f"{modality}: none"
        else:
            for prefix, why in rules:
                if name == prefix or name.startswith(prefix + "."):
                    reason = why
                    break
            for pattern in policy.keep_16bit:
                if re.search(rf"(^|\.)(?:{pattern})($|\.)", name):
                    used_patterns.add(pattern)
                    reason = reason or f"keep_16bit: {pattern}"
        if reason:
            kept[name] = reason
        else:
            quantized.append(name)
    unused = [p for p in policy.keep_16bit if p not in used_patterns
              and not any(re.search(rf"(^|\.)(?:{p})($|\.)", n) for n in linears)]
    if unused:
        raise MMTuningError(
            f"mmtuning.quant.keep_16bit: {unused} match no Linear module of '{layout.model_type}'. Patterns match whole "
            f"dotted segments of full names, e.g. `attn.proj` or `blocks.7`; some names here: "
            f"{', '.join(list(linears)[:3])}, ... (`mmtune inspect-targets MODEL --quant ...` lists them).")
    plan = QuantPlan(policy, modality_of, quantized, kept)
    plan.skip_modules = _skip_list(kept, quantized, output_name)
    return plan


def _output_embedding_name(model: nn.Module) -> str:
    base = unwrap(model)
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in base.named_modules():
        if head is not None and module is head:
            return name
    return "lm_head"


def _keep_rules(model: nn.Module, layout: ModelLayout, policy: QuantPolicy) -> list[tuple[str, str]]:
    """(module prefix, reason) for the modules a policy keeps 16-bit inside quantized modalities."""
    mmap = layout.modality_map
    rules: list[tuple[str, str]] = []
    if policy.keep_patch_embed:
        rules += [(leaf.name, "patch embedding") for leaf in layout.leaves if leaf.kind == "patch_embed"]
    if policy.keep_vision_edge_blocks:
        blocks = numbered_blocks(model, mmap.vision_layers)
        if blocks:  # "last" = the last block the projector reads (LLaVA: N-2; block N-1 feeds nothing)
            last = blocks[layout.usable_layers.get("vision", len(blocks)) - 1]
            rules += [(blocks[0], "first vision block"), (last, "last vision block the projector reads")]
    if policy.keep_cross_attention and mmap.cross_attention_layers:
        indices = get_dotted(model.config, mmap.cross_attention_layers) or []
        blocks = numbered_blocks(model, mmap.language_layers)
        rules += [(blocks[i], f"cross-attention layer {i}") for i in indices if 0 <= i < len(blocks)]
    return rules


def _skip_list(kept: dict[str, str], quantized: list[str], output_name: str) -> list[str]:
    """The shortest list of full names covering every kept Linear and no quantized one.

    Each kept name rolls up to its highest ancestor that holds no quantized Linear, so a whole 16-bit tower is one
    entry (`model.vision_tower`) and a kept block is one entry (`model.visual.blocks.0`). Names are full and
    anchored: transformers 5.20+ matches them with `re.match` at a module boundary.
    """
    occupied = set()
    for name in quantized:
        parts = name.split(".")
        occupied.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    chosen: set[str] = {output_name}
    for name in kept:
        parts = name.split(".")
        top = name
        for i in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:i])
            if ancestor in occupied:
                break
            top = ancestor
        chosen.add(top)
    return sorted(n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n))


def bnb_config_kwargs(config: "MMTuningConfig", model_config: Any) -> dict[str, Any] | None:
    """kwargs for `transformers.BitsAndBytesConfig(**kwargs)` under `config.quant`, or None without a policy.

    Module names come from a meta-device skeleton of `model_config`, so nothing is allocated or downloaded.
    """
    policy = policy_of(config)
    if policy is None or policy.quant_type is None:
        return None
    from ..loading import build_skeleton

    return bnb_kwargs_for_plan(plan_quantization(build_skeleton(model_config), policy))
