"""One exception type for everything a user can fix: the CLI prints its message, no traceback."""

from __future__ import annotations


class MMTuningError(ValueError):
    """A problem in the user's input or model, phrased as what was wrong and what to write instead."""


class PlanMismatchError(MMTuningError):
    """PEFT (or a host) wrapped a different set of modules than the target plan asked for."""
