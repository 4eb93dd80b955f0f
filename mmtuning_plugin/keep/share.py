"""Which keep rows each micro-batch asks: the optimizer step's rows spread over its accumulation micro-batches.

Keep rows are drawn per optimizer step, not per micro-batch: with gradient accumulation 8 a step asks as many rows
as without it, spread evenly, and each micro-batch's term is scaled so the step's keep gradient is the mean over its
rows. A function of (step, micro-batch), so a resumed run asks the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Share:
    """One micro-batch's part of its optimizer step's keep rows."""

    rows: int  # keep rows asked in this micro-batch (0: none here)
    first: int  # the run's index of its first keep row (prompts and pool rows are taken in turn from it;
    #             `refresh` groups micro-batches by it)
    scale: float  # makes the step's keep gradient the mean over its rows, as the Trainer averages micro-batches


def keep_share(spec: Any, task_rows: int, step: int, micro: int, accumulation: int, chunk: int = 1) -> Share:
    """`per: step`: `batch_size` keep rows per optimizer step (default half its training rows: at micro-batch 1
    without accumulation that is one row every second step), spread over its `accumulation` micro-batches so
    accumulation adds no keep rows. Where a step has fewer rows than micro-batches, they come in groups of `chunk`
    (the prompts asked about one image together, so the base reads that image once). `per: micro-batch`:
    `batch_size` rows in each micro-batch."""
    accumulation = max(1, accumulation)
    if spec.per == "micro-batch":
        size = spec.batch_size or max(1, (task_rows + 1) // 2)
        first = (step * accumulation + micro) * size
        return Share(size, first, 1.0)
    rate = spec.batch_size or task_rows * accumulation / 2  # keep rows per optimizer step, on average
    start = math.floor(step * rate + 1e-9)
    total = math.floor((step + 1) * rate + 1e-9) - start
    m = micro % accumulation
    if total >= accumulation:  # every micro-batch asks some, about its own images
        before = m * total // accumulation
        rows = (m + 1) * total // accumulation - before
    else:
        size = max(1, min(chunk, total or 1))
        groups = -(-total // size)
        group = next((g for g in range(groups) if ((g + 1) * accumulation) // groups - 1 == m), None)
        before = group * size if group is not None else 0
        rows = min(size, total - before) if group is not None else 0
    return Share(rows, start + before, accumulation * rows / rate)
