"""What a user hands the CLI and the hosts as settings: a spec file holding an `mmtuning:` block, `--set KEY=VALUE`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .errors import MMTuningError


def read_spec(spec: Optional[Path], sets: list[str]) -> dict[str, Any]:
    """The `mmtuning:` block from a YAML file (the block itself or a host YAML holding it) plus --set edits."""
    from .files import read_yaml

    data: dict[str, Any] = {}
    if spec is not None:
        loaded = read_yaml(spec, f"--spec {spec}", "a YAML file with an `mmtuning:` block") or {}
        if not isinstance(loaded, dict):
            raise MMTuningError(f"--spec {spec}: expected a mapping (an `mmtuning:` block), got {type(loaded).__name__}.")
        data = loaded.get("mmtuning", loaded) or {}
    for item in sets:
        apply_set(data, item)
    return data


def apply_set(data: dict[str, Any], item: str) -> None:
    """`--set vision.layers=top:8` edits the block; the value is read as YAML (numbers, lists, true/false)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise MMTuningError(f"--set {item!r}: write KEY=VALUE, e.g. --set vision.modules=attention --set vision.r=8")
    value = yaml.safe_load(raw) if raw.strip() else None
    *parents, leaf = key.strip().split(".")
    target = data
    for part in parents:
        current = target.get(part)
        if current is None or isinstance(current, bool):
            current = {} if current is None or current else {"enabled": False}
            target[part] = current
        if not isinstance(current, dict):
            raise MMTuningError(f"--set {item!r}: '{part}' is {current!r}, not a block of settings.")
        target = current
    if isinstance(target.get(leaf), dict) and isinstance(value, bool):  # `--set vision=false` after vision.* edits
        value = {**target[leaf], "enabled": value}  # keeps them, so the schema can refuse the contradiction
    target[leaf] = value
