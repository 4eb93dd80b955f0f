"""Which modality each adapter module belongs to, read from the base's modality map (never from name guesses)."""

from __future__ import annotations

from typing import Optional

from ..arch import MODALITIES
from ..errors import MMTuningError
from .adapter import Adapter
from .base import BaseArchitecture, detect_layout, extra_param_name, load_base, renamed_adapter, verify
from .layouts import CURRENT, check_layout, rename


def parse_modalities(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODALITIES]
    if not names or unknown:
        raise MMTuningError(f"{option} {text!r}: write a comma list of {', '.join(MODALITIES)}, e.g. {option} language.")
    return names


def parse_ranks(text: Optional[str]) -> dict[str, int]:
    """`vision=4,language=16` -> {"vision": 4, "language": 16}."""
    ranks: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in MODALITIES or not value.strip().isdigit() or int(value) < 1:
            raise MMTuningError(f"--per-modality {item!r}: write MODALITY=RANK with a modality of {', '.join(MODALITIES)} "
                                f"and a rank >= 1, e.g. --per-modality vision=4,language=16.")
        ranks[key.strip()] = int(value)
    return ranks


class Located:
    """An adapter with its base, its source layout, and the 5.x name and modality of each module."""

    def __init__(self, adapter: Adapter, base_name: Optional[str], source: Optional[str]):
        self.adapter = adapter
        self.base: BaseArchitecture = load_base(adapter, base_name)
        self.layout = check_layout(source, "--from") if source else detect_layout(adapter, self.base)
        self.current = renamed_adapter(adapter, self.base.family, self.layout, CURRENT)
        verify(self.current, self.base, f"{adapter.path} (layout {self.layout})")

    def current_name(self, module: str) -> str:
        return rename(module, self.base.family, self.layout, CURRENT)

    def modality(self, module: str) -> str:
        return self.base.modality(self.current_name(module))

    def extra_modality(self, key: str) -> str:
        name = self.current_name(extra_param_name(key))
        return self.base.modality(name.rsplit(".", 1)[0])
