"""remap: rewrite an adapter's tensor keys and adapter_config.json between transformers layouts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .placement import safe_output
from .adapter import Adapter, rank_alpha, read_adapter, write_adapter
from .base import BaseArchitecture, detect_layout, load_base, renamed_adapter, verify
from .layouts import CURRENT, LayoutFamily, check_layout, rename
from ..errors import MMTuningError


def _peft_targets(config: dict[str, Any], names: list[str]) -> set[str]:
    """Which of `names` PEFT would wrap with this config's target_modules (PEFT's own matcher)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=config.get("target_modules"), exclude_modules=config.get("exclude_modules"),
                       layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"))
    return {n for n in names if check_target_module_exists(probe, n)}


def _exact_regex(modules: list[str]) -> str:
    return "(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def remap_config(config: dict[str, Any], old: Adapter, family: LayoutFamily, source: str, target: str,
                 base: BaseArchitecture) -> tuple[dict[str, Any], list[str]]:
    """The config in the target layout, and notes on what had to be made explicit."""
    notes: list[str] = []
    new = dict(config)
    to_current = {rename(m, family, source, CURRENT): m for m in old.modules}
    in_target = {m: rename(m, family, source, target) for m in old.modules}
    targets = config.get("target_modules")
    if isinstance(targets, str):
        new["target_modules"] = _exact_regex(list(in_target.values()))
        notes.append("regex target_modules rewritten as the exact alternation of the adapter's modules")
    elif targets:
        renamed = [rename(t, family, source, target) for t in targets]
        check = [rename(t, family, target, CURRENT) for t in renamed]
        if _peft_targets({**config, "target_modules": check}, list(base.modules)) == set(to_current):
            new["target_modules"] = renamed
        else:
            new["target_modules"] = sorted(in_target.values())
            notes.append("list target_modules did not select exactly the adapter's modules after renaming; "
                         "written as the explicit list of its modules")
    if config.get("modules_to_save"):
        new["modules_to_save"] = [rename(m, family, source, target) for m in config["modules_to_save"]]
    for key, index in (("rank_pattern", 0), ("alpha_pattern", 1)):
        if config.get(key):
            default = config.get("r" if index == 0 else "lora_alpha")
            per_module = {in_target[m]: rank_alpha(config, m)[index] for m in old.modules}
            new[key] = {re.escape(m): v for m, v in per_module.items() if v != default}
            notes.append(f"{key} rewritten per module (exact names)")
    return new, notes


def remap(adapter_dir: Path, out: Path, source: Optional[str] = None, target: str = CURRENT,
          base: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    adapter = read_adapter(Path(adapter_dir))
    model = load_base(adapter, base)
    target = check_layout(target, "--to")
    source = check_layout(source, "--from") if source else detect_layout(adapter, model)
    family = model.family
    for layout, option in ((source, "--from"), (target, "--to")):
        if layout in family.absent:
            raise MMTuningError(f"{option} {layout}: {model.model_type} did not exist in transformers {layout}.")
    current = renamed_adapter(adapter, family, source, CURRENT)
    verify(current, model, f"{adapter_dir} read as layout {source}")
    converted = renamed_adapter(adapter, family, source, target)
    config, notes = remap_config(adapter.config, adapter, family, source, target, model)
    converted.config = config
    with safe_output(Path(out), force, (Path(adapter_dir),)) as temp:
        write_adapter(converted, temp)
    renamed = sum(1 for a, b in zip(adapter.modules, converted.modules) if a != b)
    return {"command": "remap", "adapter": str(adapter_dir), "out": str(out), "model_type": model.model_type,
            "from": source, "to": target, "modules": len(adapter.modules), "renamed_modules": renamed,
            "extra_tensors": len(adapter.extra), "verified_against": model.name, "notes": notes,
            "example": {next(iter(adapter.modules)): next(iter(converted.modules))}}
