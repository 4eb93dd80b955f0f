"""Which base modules a selective method trains (`selective:` on a modality), and which of their tensors.

A selected module is trained through PEFT `modules_to_save` (the same mechanism as `projector: {full: true}`):
PEFT keeps the frozen original and trains a copy, and the saved adapter holds the copy, so it saves, loads and
converts like any adapter. `bias` trains only the copy's bias: its other tensors are frozen again after wrapping.
A packed 4-bit module cannot be copied and trained, so selecting one is refused, naming the `quant:` setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..arch import Leaf, ModelLayout, numbered_blocks, unwrap
from ..config import MMTuningConfig, layer_span
from ..errors import MMTuningError
from ..quant.bnb import precision_of
from ..quant.plan import plan_quantization

# Normalization layers across transformers (LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, GroupNorm ...).
NORM_CLASS = re.compile(r"(Layer|RMS|Group)Norm")


@dataclass(frozen=True)
class SelectedModule:
    """A base module a selective method trains: the tensors it trains (`trained`, local names) and its size."""

    name: str
    modality: str
    layer: int | None
    method: str
    trained: tuple[str, ...]
    trained_params: int
    module_params: int  # every tensor of the module: modules_to_save keeps a copy of all of them


def plan_selective(model: nn.Module, layout: ModelLayout, config: MMTuningConfig, modality: str,
                   linears: list[Leaf], layers: list[int] | None, where: str) -> list[SelectedModule]:
    """The modules `config.<modality>.selective` trains: among `linears` (the Linear leaves `modules`/`layers`
    chose) and the norms in the selected `layers` (the whole projector when it has no layers)."""
    base = unwrap(model)
    method = config.spec(modality).selective.method
    norms = _norms_in(base, layout, modality, layers)
    if method == "layernorm":
        candidates = [(name, layer, _own(module)) for name, layer, module in norms]
    elif method == "bias":
        found = [(leaf.name, leaf.layer, base.get_submodule(leaf.name)) for leaf in linears] + norms
        candidates = [(name, layer, ("bias",)) for name, layer, module in found if _has(module, "bias")]
    else:  # full, spider: whole Linear modules, and the layers' norms unless `modules:` names what to train
        found = [(leaf.name, leaf.layer, base.get_submodule(leaf.name)) for leaf in linears]
        found += [] if "modules" in config.spec(modality).model_fields_set else norms
        candidates = [(name, layer, _own(module)) for name, layer, module in found]
    selected = [_selected(base, name, modality, layer, method, trained) for name, layer, trained in candidates if trained]
    if not selected:
        raise MMTuningError(_nothing_found(layout, modality, method, layers, where))
    _refuse_packed(base, layout, config, modality, selected, where)
    return selected


def _selected(base: nn.Module, name: str, modality: str, layer: int | None, method: str,
              trained: tuple[str, ...]) -> SelectedModule:
    module = base.get_submodule(name)
    counts = {local: _numel(param) for local, param in module.named_parameters(recurse=False)}
    return SelectedModule(name, modality, layer, method, trained, sum(counts[t] for t in trained), sum(counts.values()))


def _numel(param: nn.Parameter) -> int:
    """Logical element count (a bnb 4-bit weight is packed; its shape is kept in quant_state)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(shape.numel()) if shape is not None else param.numel()


def _own(module: nn.Module) -> tuple[str, ...]:
    return tuple(local for local, _ in module.named_parameters(recurse=False))


def _has(module: nn.Module, local: str) -> bool:
    return isinstance(getattr(module, local, None), nn.Parameter)


def _norms_in(base: nn.Module, layout: ModelLayout, modality: str, layers: list[int] | None):
    """(name, layer, module) of every norm with its own parameters in the selected layers of `modality` (for a
    projector without numbered layers: anywhere in it)."""
    mmap = layout.modality_map
    blocks = numbered_blocks(base, mmap.layer_stacks(modality))
    if blocks:
        roots = [(name, index) for index, name in enumerate(blocks) if layers is None or index in layers]
    elif modality == "projector":
        roots = [(prefix, None) for prefix in mmap.projector]
    else:
        roots = []
    found = []
    for root, index in roots:
        for local, module in base.get_submodule(root).named_modules():
            if NORM_CLASS.search(type(module).__name__) and _own(module):
                found.append((f"{root}.{local}" if local else root, index, module))
    return found


def _nothing_found(layout: ModelLayout, modality: str, method: str, layers: list[int] | None, where: str) -> str:
    place = f"layer{'s' if len(layers) > 1 else ''} {layer_span(layers)} of {modality}" if layers else modality
    what = {"layernorm": "has no normalization layer with weights",
            "bias": "has no bias (neither its selected Linear modules nor its norms have one)",
            }.get(method, "has no Linear module")
    instead = {"layernorm": "`selective: bias` or `full`, or adapters (remove `selective`)",
               "bias": "`selective: layernorm` or `full`, or adapters (remove `selective`)"}.get(
        method, "adapters (remove `selective`) or another modality")
    return f"{where}.selective: {method} finds nothing to train: {place} of '{layout.model_type}' {what}. Use {instead}."


def _refuse_packed(base: nn.Module, layout: ModelLayout, config: MMTuningConfig, modality: str,
                   selected: list[SelectedModule], where: str) -> None:
    """A packed 4-bit (or 8-bit) Linear cannot be copied and trained: refuse, naming the `quant:` setting."""
    packed = [s.name for s in selected if precision_of(base.get_submodule(s.name)) != "16bit"]
    policy = config.quant
    if policy is not None and policy.quant_type is not None:
        quantized = set(plan_quantization(base, policy, layout).quantized)
        packed += [s.name for s in selected if s.name in quantized and s.name not in packed]
    if not packed:
        return
    method = config.spec(modality).selective.method
    precision = policy.precisions()[modality] if policy is not None else "4-bit (the host's load_in_4bit / quantization_bit)"
    shown = ", ".join(packed[:4]) + (f" and {len(packed) - 4} more" if len(packed) > 4 else "")
    raise MMTuningError(
        f"{where}.selective: {method} trains {len(packed)} module(s) of {modality} whole or their bias through a "
        f"trainable copy, but they load quantized ({modality}: {precision}): {shown}. A packed quantized weight "
        f"cannot be copied and trained. Keep {modality} 16-bit (`quant: {{{modality}: none}}`), keep those layers "
        f"16-bit (add `{_block_of(packed[-1])}` to `quant.keep_16bit`), or use "
        f"`selective: layernorm` or adapters (remove `selective`) on {modality}.")


def _block_of(name: str) -> str:
    """The numbered layer a module sits in (`model.language_model.layers.31`), or the module itself."""
    match = re.match(r"(.*\.\d+)\.", name)
    return match.group(1) if match else name


def summary(selected: list[SelectedModule]) -> dict[str, Any]:
    """Per modality: method, modules, trained parameters (for `inspect-targets --json` and run reports)."""
    out: dict[str, Any] = {}
    for item in selected:
        row = out.setdefault(item.modality, {"method": item.method, "modules": [], "trained_params": 0,
                                             "copied_params": 0})
        row["modules"].append(item.name)
        row["trained_params"] += item.trained_params
        row["copied_params"] += item.module_params
    return out
