"""Scoring of the survey "Keeping Yourself is Important in Downstream Tuning MLLMs" (arXiv 2503.04543):
E = accuracy gain on the target task, F = change of accuracy on general skills (negative = forgetting),
O = E + F, in accuracy points. `mmtune eval` and `mmtune demo` both score through these functions.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Sequence

MATCHES = ("exact", "normalised")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed: `The Circle.` == `circle`."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def matches(prediction: str, expected: str, match: str = "exact") -> bool:
    if match == "exact":
        return prediction.strip() == expected.strip()
    return normalise(prediction) == normalise(expected)


def accuracy(predictions: Sequence[str], expected: Sequence[str], match: str = "exact") -> float:
    if not expected:
        raise ValueError("accuracy of an empty set")
    return sum(matches(p, e, match) for p, e in zip(predictions, expected)) / len(expected)


def accuracy_by_kind(predictions: Sequence[str], expected: Sequence[str], kinds: Sequence[str],
                     match: str = "exact") -> dict[str, float]:
    """Accuracy per question type (which skills were kept), in first-seen order."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for prediction, answer, kind in zip(predictions, expected, kinds):
        groups[kind].append(matches(prediction, answer, match))
    return {kind: sum(hits) / len(hits) for kind, hits in groups.items()}


def efo(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """E (target gain), F (general change: forgetting when negative) and O = E + F, in accuracy points."""
    e = 100 * (after["target"] - before["target"])
    f = 100 * (after["general"] - before["general"])
    return {"E": e, "F": f, "O": e + f}
