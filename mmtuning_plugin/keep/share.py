"""Which keep rows each micro-batch asks: the optimizer step's rows spread over its accumulation micro-batches.

Keep rows are drawn per optimizer step, not per micro-batch: with gradient accumulation 8 a step asks as many rows
as without it, spread evenly, and each micro-batch's term is scaled so the step's keep gradient is the mean over its
rows. A function of (step, micro-batch), so a resumed run asks the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Share:
    """One micro-batch's part of its optimizer step's keep rows."""

    rows: int  # keep rows asked in this micro-batch (0: none here)
    first: int  # the run's index of its first keep row (prompts and pool rows are taken in turn from it)
    call: int  # the run's index of this keep-bearing micro-batch (`refresh` groups these)
    scale: float  # makes the step's keep gradient the mean over its rows, as the Trainer averages micro-batches


def keep_share(spec: Any, task_rows: int, step: int, micro: int, accumulation: int) -> Share:
    """`per: step`: the step's `batch_size` keep rows (default half its training rows, at least 1) spread evenly over
    its `accumulation` micro-batches, so accumulation adds no keep rows; `per: micro-batch`: `batch_size` in each."""
    accumulation = max(1, accumulation)
    if spec.per == "micro-batch":
        size = spec.batch_size or max(1, (task_rows + 1) // 2)
        call = step * accumulation + micro
        return Share(size, call * size, call, 1.0)
    total = spec.batch_size or max(1, (task_rows * accumulation + 1) // 2)
    m = micro % accumulation
    before = m * total // accumulation
    rows = (m + 1) * total // accumulation - before
    calls_per_step = min(total, accumulation)
    call = step * calls_per_step + (m if total >= accumulation else before)
    return Share(rows, step * total + before, call, accumulation * rows / total)
