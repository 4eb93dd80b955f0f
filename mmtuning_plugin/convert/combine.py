"""combine: task-arithmetic merging of LoRA adapters trained on the same base.

- linear: delta = sum_i w_i * delta_i, written exactly by concatenating the factors along the rank
  (rank = sum of the ranks of adapters with a non-zero weight); `rank` truncates it by SVD.
- ties / dare_linear / dare_ties (Yadav et al. 2023; Yu et al. 2023, as in PEFT's merge_utils): applied to
  the dense per-module deltas, then factored back to `rank` (default: the largest input rank) by SVD;
  the relative error of that factorisation is reported.
Output names are in the transformers 5.x layout, whatever layouts the inputs used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MMTuningError
from .placement import safe_output
from .adapter import Adapter, Factors, explicit_config, factors_from_delta, read_adapter, write_adapter
from .modality import Located
from .resize import truncate

METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def _magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * delta.numel())
    if keep <= 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def _random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(delta.shape, generator=generator) < density
    return delta * mask / density


def _disjoint_merge(weighted: torch.Tensor) -> torch.Tensor:
    """TIES: elect each entry's sign by the summed mass, average the entries that agree with it."""
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    total = (weighted * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def combine_dense(deltas: list[torch.Tensor], weights: list[float], method: str, density: float,
                  generator: torch.Generator) -> torch.Tensor:
    if method == "ties":
        pruned = [_magnitude_prune(d, density) for d in deltas]
    else:
        pruned = [_random_prune(d, density, generator) for d in deltas]
    weighted = torch.stack([w * d for w, d in zip(weights, pruned)])
    return weighted.sum(0) if method == "dare_linear" else _disjoint_merge(weighted)


def _concat(parts: list[tuple[float, Factors]]) -> Factors:
    a = torch.cat([f.a.float() for _, f in parts], dim=0)
    b = torch.cat([(w * f.scaling) * f.b.float() for w, f in parts], dim=1)
    first = parts[0][1]
    return Factors(a.to(first.a.dtype), b.to(first.b.dtype), 1.0, first.embedding)


def _zero_like(f: Factors) -> Factors:
    return Factors(torch.zeros_like(f.a), torch.zeros_like(f.b), 1.0, f.embedding)


def combine(adapter_dirs: list[Path], out: Path, method: str = "linear", weights: Optional[list[float]] = None,
            rank: Optional[int] = None, density: float = 0.5, seed: int = 0, base: Optional[str] = None,
            force: bool = False) -> dict[str, Any]:
    if method not in METHODS:
        raise MMTuningError(f"--method {method!r}: write one of {', '.join(METHODS)}.")
    if len(adapter_dirs) < 2:
        raise MMTuningError("combine needs at least two adapters.")
    weights = list(weights) if weights else [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise MMTuningError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters; give one per adapter.")
    if not 0 < density <= 1:
        raise MMTuningError(f"--density {density}: the kept fraction is in (0, 1].")
    if rank is not None and rank < 1:
        raise MMTuningError(f"--rank {rank}: a rank is at least 1.")
    if method == "linear" and density != 0.5:
        raise MMTuningError(f"--density {density} only applies to ties, dare_linear and dare_ties; with --method linear "
                            f"every entry is kept. Drop --density or choose one of those methods.")
    if not method.startswith("dare") and seed != 0:
        raise MMTuningError(f"--seed {seed} only applies to dare_linear and dare_ties (their random drop); drop it or "
                            f"choose one of those methods.")
    adapters = [read_adapter(Path(d)) for d in adapter_dirs]
    names = {a.base_name for a in adapters}
    if len(names) > 1 and base is None:
        raise MMTuningError(f"The adapters name different base models ({', '.join(sorted(map(str, names)))}); "
                            f"task arithmetic only makes sense on one base. Pass --base to check them all against it.")
    located = [Located(a, base, None) for a in adapters]
    types = {loc.base.model_type for loc in located}
    if len(types) > 1:
        raise MMTuningError(f"The adapters belong to different model types ({', '.join(sorted(types))}); combine needs one base.")
    for loc, path in zip(located, adapter_dirs):
        if loc.current.extra:
            raise MMTuningError(f"{path} has modules_to_save tensors ({len(loc.current.extra)}); combine merges LoRA "
                                f"modules only. Drop them first (mmtune convert split) or merge the adapter instead.")
    union = sorted({m for loc in located for m in loc.current.modules})
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, Factors] = {}
    rows = []
    dropped_all = total_all = 0.0
    for module in union:
        present = [(w, loc.current.modules.get(module)) for w, loc in zip(weights, located)]
        template = next(f for _, f in present if f is not None)
        if method == "linear":
            parts = [(w, f) for w, f in present if f is not None and w != 0]
            merged = _concat(parts) if parts else _zero_like(template)
            if rank is not None and merged.rank > rank:
                merged, dropped, total = truncate(merged, rank)
            else:
                dropped, total = 0.0, float(merged.delta().pow(2).sum())
        else:
            deltas = [f.delta() if f is not None else torch.zeros_like(template.delta()) for _, f in present]
            dense = combine_dense(deltas, [w for w, _ in present], method, density, generator)
            target = rank or max(f.rank for _, f in present if f is not None)
            a, b, s = factors_from_delta(dense, target, template.embedding)
            k = a.shape[0]
            merged = Factors(a.reshape(k, *template.a.shape[1:]).to(template.a.dtype),
                             b.reshape(template.b.shape[0], k, *template.b.shape[2:]).to(template.b.dtype), 1.0,
                             template.embedding)
            dropped, total = float((s[k:] ** 2).sum()), float((s ** 2).sum())
        modules[module] = merged
        dropped_all, total_all = dropped_all + dropped, total_all + total
        rows.append({"module": module, "rank": merged.rank, "in_adapters": sum(f is not None for _, f in present),
                     "svd_relative_error": math.sqrt(dropped / total) if total > 0 else 0.0})
    first = adapters[0]
    result = Adapter(None, explicit_config(first.config, modules), modules)
    if base:
        result.config["base_model_name_or_path"] = first.base_name or base
    with safe_output(Path(out), force, tuple(Path(d) for d in adapter_dirs)) as temp:
        write_adapter(result, temp)
    return {"command": "combine", "adapters": [str(d) for d in adapter_dirs], "out": str(out), "method": method,
            "weights": weights, "density": density if method != "linear" else None, "layout": "5.x",
            "modules": rows, "ranks": sorted({r["rank"] for r in rows}),
            "total_svd_relative_error": math.sqrt(dropped_all / total_all) if total_all > 0 else 0.0}
