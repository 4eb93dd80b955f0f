"""The base architecture an adapter belongs to: built on the meta device, used to verify every tensor lands
on a real module with the right shape, and to tell each module's modality from the modality maps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from ..errors import MMTuningError
from .adapter import PREFIX, Adapter, Factors
from .layouts import CURRENT, LAYOUTS, LayoutFamily, family_of, rename


@dataclass
class BaseArchitecture:
    """The base model an adapter belongs to, as a meta skeleton (named apart from pydantic's BaseModel)."""

    name: str
    skeleton: torch.nn.Module

    @property
    def model_type(self) -> str:
        return self.skeleton.config.model_type

    @cached_property
    def family(self) -> LayoutFamily:
        return family_of(self.model_type)

    @cached_property
    def modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.skeleton.named_modules())

    @cached_property
    def parameters(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.skeleton.named_parameters(remove_duplicate=False)}

    @cached_property
    def layout(self):
        from ..arch import resolve_layout
        return resolve_layout(self.skeleton)

    def modality(self, module: str) -> str:
        """vision / projector / language from the modality map (leaves first, then the map's longest prefix)."""
        from ..names import modality_by_map

        leaf = self._leaves.get(module)
        if leaf is not None:
            return leaf.modality
        modality = modality_by_map(module, self.layout.modality_map)
        if modality is not None:
            return modality
        raise MMTuningError(f"Module {module} of {self.model_type} belongs to no modality of its modality map.")

    def kind(self, module: str) -> Optional[str]:
        """The module's kind in the layout (attention, mlp, lm_head, ...), None for a module outside it."""
        leaf = self._leaves.get(module)
        return leaf.kind if leaf is not None else None

    @cached_property
    def _leaves(self):
        return {leaf.name: leaf for leaf in self.layout.leaves}

    def check_module(self, module: str, factors: Factors) -> Optional[str]:
        """Why `factors` cannot land on `module` (None when it can)."""
        target = self.modules.get(module)
        weight = getattr(target, "weight", None) if target is not None else None
        if weight is None:
            return f"{module}: no such module with a weight in {self.model_type}"
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        if factors.embedding:
            got = (factors.a.shape[1], factors.b.shape[0])
        else:
            got = (factors.b.shape[0], math.prod(factors.a.shape[1:]))
        if got != (rows, cols):
            return f"{module}: adapter delta is {got[0]}x{got[1]} but the module's weight is {tuple(weight.shape)}"
        return None

    def check_extra(self, key: str, tensor: torch.Tensor) -> Optional[str]:
        name = extra_param_name(key)
        shape = self.parameters.get(name)
        if shape is None:
            return f"{key}: no parameter {name} in {self.model_type}"
        if tuple(shape) != tuple(tensor.shape):
            return f"{key}: tensor is {tuple(tensor.shape)} but {name} is {tuple(shape)}"
        return None

    def offenders(self, adapter: Adapter) -> list[str]:
        found = [self.check_module(m, f) for m, f in adapter.modules.items()]
        found += [self.check_extra(k, t) for k, t in adapter.extra.items()]
        return [problem for problem in found if problem]


def extra_param_name(key: str) -> str:
    """The base parameter an extra tensor stands for: a modules_to_save copy, or the base weight PEFT saves beside
    LoRA on lm_head/embed_tokens (`lm_head.base_layer.weight`, save_embedding_layers="auto")."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for wrapper in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
        name = name.replace(wrapper, ".")
    return name


def load_base(adapter: Adapter, base: Optional[str]) -> BaseArchitecture:
    """The meta skeleton of `--base` (a model dir, cached hub id or model type) or the adapter's base model."""
    from ..loading import build_skeleton, load_model_config

    name = base or adapter.base_name
    if not name:
        raise MMTuningError(f"{adapter.path}: adapter_config.json has no base_model_name_or_path; pass --base MODEL "
                            f"(the base model directory, a cached hub id, or its model type such as llava).")
    try:
        config = load_model_config(name)
    except MMTuningError as error:
        raise MMTuningError(f"Cannot build the base architecture to verify against: {error} "
                            f"(pass --base with a local model directory or a model type).") from None
    return BaseArchitecture(name, build_skeleton(config))


def verify(adapter: Adapter, base: BaseArchitecture, what: str) -> None:
    """Every tensor lands on a real module with the right shape, else one paragraph listing the offenders."""
    problems = base.offenders(adapter)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise MMTuningError(f"{what}: {len(problems)} of {len(adapter.modules) + len(adapter.extra)} adapter tensors do "
                            f"not fit {base.name} ({base.model_type}, transformers {CURRENT} layout): {shown}. "
                            f"Check --base (wrong base model?) and --from.")


def renamed_adapter(adapter: Adapter, family: LayoutFamily, source: str, target: str) -> Adapter:
    """The same tensors under the names of another layout (config untouched; see remap for the config)."""
    modules = {rename(m, family, source, target): f for m, f in adapter.modules.items()}
    extra = {PREFIX + rename(k[len(PREFIX):], family, source, target) if k.startswith(PREFIX) else k: t
             for k, t in adapter.extra.items()}
    return Adapter(adapter.path, adapter.config, modules, extra)


def detect_layout(adapter: Adapter, base: BaseArchitecture) -> str:
    """The layout in which every tensor, renamed to 5.x, lands on the base; ambiguous or none is an error."""
    family = base.family
    fits: dict[str, int] = {}
    for layout in LAYOUTS:
        if layout in family.absent:
            continue
        fits[layout] = len(base.offenders(renamed_adapter(adapter, family, layout, CURRENT)))
    clean = [layout for layout, bad in fits.items() if bad == 0]
    if not clean:
        best = min(fits, key=fits.get)
        verify(renamed_adapter(adapter, family, best, CURRENT), base, f"{adapter.path}: no layout fits (closest {best})")
    names = {layout: sorted(renamed_adapter(adapter, family, layout, CURRENT).modules) for layout in clean}
    if len({tuple(n) for n in names.values()}) > 1:
        raise MMTuningError(f"{adapter.path}: the adapter fits several layouts with different meanings "
                            f"({', '.join(clean)}); pass --from.")
    # the newest layout that fits: for families unchanged across versions any answer means the same names
    return clean[-1]
