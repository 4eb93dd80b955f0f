"""resize: change adapter ranks by truncated SVD of each scaling * B @ A, reporting the relative error.

The delta has rank <= r, so its SVD is taken through QR of the thin factors (no dense out x in matrix).
The scaling is folded into the new factors (alpha = r, no rsLoRA), so the written adapter means exactly
the truncated delta under PEFT's rules.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MMTuningError
from .placement import safe_output
from .adapter import Adapter, Factors, explicit_config, lowrank_svd, read_adapter, write_adapter
from .modality import Located, parse_ranks


def truncate(f: Factors, rank: int) -> tuple[Factors, float, float]:
    """The best rank-`rank` factors of f's delta, the dropped and the total squared Frobenius norms."""
    u, s, vh = lowrank_svd(f)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).reshape(k, *f.a.shape[1:])
    b = (u[:, :k] * root[None, :]).reshape(f.b.shape[0], k, *f.b.shape[2:])
    total, dropped = float((s ** 2).sum()), float((s[k:] ** 2).sum())
    return Factors(a.to(f.a.dtype).contiguous(), b.to(f.b.dtype).contiguous(), 1.0, f.embedding), dropped, total


def resize(adapter_dir: Path, out: Path, rank: Optional[int] = None, per_modality: Optional[str] = None,
           base: Optional[str] = None, source: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    ranks = parse_ranks(per_modality)
    if rank is None and not ranks:
        raise MMTuningError("resize needs --rank R and/or --per-modality vision=4,language=16.")
    if rank is not None and rank < 1:
        raise MMTuningError(f"--rank {rank}: a rank is at least 1 (use `mmtune convert split` to drop modules).")
    located = Located(read_adapter(Path(adapter_dir)), base, source)
    adapter = located.adapter
    modules: dict[str, Factors] = {}
    rows, dropped_all, total_all = [], 0.0, 0.0
    for module, factors in adapter.modules.items():
        modality = located.modality(module)
        wanted = ranks.get(modality, rank)
        if wanted is None:  # modality not named and no global --rank: unchanged, scaling folded
            wanted = factors.rank
        new, dropped, total = truncate(factors, wanted)
        modules[module] = new
        dropped_all, total_all = dropped_all + dropped, total_all + total
        rows.append({"module": module, "modality": modality, "rank_from": factors.rank, "rank_to": new.rank,
                     "relative_error": math.sqrt(dropped / total) if total > 0 else 0.0})
    unused = sorted(set(ranks) - {row["modality"] for row in rows})
    if unused:
        raise MMTuningError(f"--per-modality names {', '.join(unused)} but the adapter has no module of that modality.")
    result = Adapter(adapter.path, explicit_config(adapter.config, modules), modules, adapter.extra)
    result.config["target_modules"] = sorted(modules)
    with safe_output(Path(out), force, (Path(adapter_dir),)) as temp:
        write_adapter(result, temp)
    by_modality = {}
    for row in rows:
        by_modality.setdefault(row["modality"], set()).add(row["rank_to"])
    return {"command": "resize", "adapter": str(adapter_dir), "out": str(out), "layout": located.layout,
            "ranks": {m: sorted(r) for m, r in by_modality.items()}, "modules": rows,
            "total_relative_error": math.sqrt(dropped_all / total_all) if total_all > 0 else 0.0}
