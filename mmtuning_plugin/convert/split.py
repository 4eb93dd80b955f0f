"""split: keep the adapter modules of some modalities (e.g. language only, for serving engines without vision
LoRA); optionally merge the dropped modalities' deltas into a copy of the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import MMTuningError
from .placement import safe_output
from .adapter import Adapter, read_adapter, write_adapter
from .base import renamed_adapter
from .layouts import CURRENT
from .merge import check_model_dir, merge_into
from .modality import Located, parse_modalities

MERGED_BASE_DIR = "merged_base"


def split(adapter_dir: Path, out: Path, keep: str, merge_rest_into: Optional[Path] = None, base: Optional[str] = None,
          source: Optional[str] = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    kept_modalities = parse_modalities(keep, "--keep")
    if merge_rest_into is not None:
        check_model_dir(Path(merge_rest_into), "--merge-rest-into")
    base_name = str(merge_rest_into) if merge_rest_into else base
    located = Located(read_adapter(Path(adapter_dir)), base_name, source)
    adapter = located.adapter
    keep_module = {m: located.modality(m) in kept_modalities for m in adapter.modules}
    keep_extra = {k: located.extra_modality(k) in kept_modalities for k in adapter.extra}
    kept = {m: f for m, f in adapter.modules.items() if keep_module[m]}
    dropped = {m: f for m, f in adapter.modules.items() if not keep_module[m]}
    dropped_extra = {k: t for k, t in adapter.extra.items() if not keep_extra[k]}
    if not kept:
        raise MMTuningError(f"--keep {keep}: the adapter has no module of {', '.join(kept_modalities)}; nothing would remain.")
    if not dropped and not dropped_extra:
        raise MMTuningError(f"--keep {keep}: every module of the adapter is already {', '.join(kept_modalities)}; "
                            f"nothing to split off.")
    config = dict(adapter.config)
    config["target_modules"] = sorted(kept)
    if config.get("modules_to_save"):
        kept_saved = [k for k, keep_it in keep_extra.items() if keep_it]
        config["modules_to_save"] = [m for m in config["modules_to_save"] if any(f".{m}." in f".{k}" for k in kept_saved)] or None
    result = Adapter(adapter.path, config, kept, {k: t for k, t in adapter.extra.items() if keep_extra[k]})
    inputs = (Path(adapter_dir),) + ((Path(merge_rest_into),) if merge_rest_into else ())
    merge_report = None
    with safe_output(Path(out), force, inputs) as temp:
        write_adapter(result, temp)
        if merge_rest_into:
            rest = renamed_adapter(Adapter(adapter.path, adapter.config, dropped, dropped_extra), located.base.family,
                                   located.layout, CURRENT)
            (temp / MERGED_BASE_DIR).mkdir()
            merge_report = merge_into(Path(merge_rest_into), temp / MERGED_BASE_DIR, located.base, rest, None,
                                      progress=progress)
    modality_of = {m: located.modality(m) for m in adapter.modules}
    return {"command": "split", "adapter": str(adapter_dir), "out": str(out), "keep": kept_modalities,
            "kept_modules": len(kept), "dropped_modules": len(dropped), "dropped_extra_tensors": len(dropped_extra),
            "dropped_modalities": sorted({modality_of[m] for m in dropped}),
            "merged_base": str(Path(out) / MERGED_BASE_DIR) if merge_rest_into else None, "merge": merge_report,
            "lost_without_merge": [] if merge_rest_into else sorted(dropped) + sorted(dropped_extra)}
