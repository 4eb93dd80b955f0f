"""Keep rows packed behind the training row whose image they ask about: the image prefix is read once.

A keep row about a training row's own image starts with the same tokens as that row: the chat template's opening
and the run of image tokens (hundreds to thousands). Joined as a row of its own (`fuse`), it carries the whole image
through the language model again, forward and backward. Packed, only its question and the base's answer (the
suffix) are appended to the training row, with a block attention mask: each suffix sees the shared prefix and
itself, never the training row's question and answer nor the other suffixes, and its positions continue from the
prefix as if it stood alone. The training row's own tokens, mask, positions and labels are unchanged, so the task
loss is the same; the keep rows' logits equal their separate forward's up to float rounding (a test compares
per-position log-probs and gradients).

Only where that holds without model-specific position rules: a checked model type (`PACKED_MODEL_TYPES`), one
image per training row, a batch of just `input_ids`, `attention_mask`, `pixel_values` (and `labels`). Batches with other
inputs (Qwen2-VL's `image_grid_thw` and its 3-D rotary positions, Gemma 3's `token_type_ids`) get joined rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batches import IGNORE_INDEX

PACKABLE = {"input_ids", "attention_mask", "pixel_values"}  # the batch keys besides labels
# Model types whose forward was checked to read a packed row exactly (tests/test_keep.py compares per-position
# logits, the term and the gradients with the keep rows' own forward): a 4-D boolean mask passed through as it is,
# explicit 1-D positions under plain rotary embeddings. Others get joined rows until checked the same way.
PACKED_MODEL_TYPES = frozenset({"llava"})


@dataclass
class Packed:
    """The packed training batch, and where each keep row's answer positions sit in it."""

    batch: dict[str, torch.Tensor]
    rows: list[int]  # per keep row: its training row
    columns: list[list[int]]  # per keep row: the batch columns of its live answer positions, in order

    def keep_logits(self, logits: torch.Tensor, positions: int) -> torch.Tensor:
        """(keep rows, positions, vocab): each keep row's logits at its answer positions; dead ones are 0."""
        out = []
        for row, columns in zip(self.rows, self.columns):
            live = logits[row, columns]
            pad = logits.new_zeros(positions - live.shape[0], logits.shape[-1])
            out.append(torch.cat([live, pad]))
        return torch.stack(out)


def packed_rows(task: dict, keep: dict[str, torch.Tensor], image_rows: list[int | None], live: torch.Tensor,
                pad_id: int, image_id: int | None) -> Packed | None:
    """`task` with the keep rows' suffixes packed behind the rows holding their images (None where that cannot be
    exact: see the module docstring). `keep`: the keep rows as their own forward reads them (left-padded prompt and
    the base's answer); `image_rows`: the training row of each keep row's image; `live`: (keep rows, positions),
    which answer positions the term reads."""
    if image_id is None or set(task) - {"labels"} != PACKABLE or any(r is None for r in image_rows):
        return None
    ids, mask = task["input_ids"], task["attention_mask"]
    if ids.dim() != 2 or mask.shape != ids.shape or task["pixel_values"].shape[0] != ids.shape[0]:
        return None
    suffixes = _suffixes(ids, mask, keep, image_rows, image_id)
    if suffixes is None:
        return None
    width = ids.shape[1] + max(sum(len(s) for r, (s, _) in zip(image_rows, suffixes) if r == row)
                               for row in range(ids.shape[0]))
    return _pack(task, suffixes, image_rows, live, pad_id, width)


def _suffixes(ids, mask, keep, image_rows, image_id):
    """Per keep row: its tokens after the prefix it shares with its training row, and that prefix's start and
    length there; None when a keep row shares less than its image tokens."""
    out = []
    for index, row in enumerate(image_rows):
        task_real = ids[row][mask[row].bool()].tolist()
        keep_real = keep["input_ids"][index][keep["attention_mask"][index].bool()].tolist()
        shared = 0
        for a, b in zip(task_real, keep_real):
            if a != b:
                break
            shared += 1
        suffix = keep_real[shared:]
        if not suffix or image_id in suffix or image_id not in keep_real[:shared]:
            return None
        start = int(mask[row].nonzero()[0]) if mask[row].any() else 0
        out.append((suffix, (start, shared)))
    return out


def _pack(task, suffixes, image_rows, live, pad_id, width) -> Packed:
    ids, mask = task["input_ids"], task["attention_mask"]
    rows, length = ids.shape
    device = ids.device
    new_ids = torch.full((rows, width), pad_id, dtype=ids.dtype, device=device)
    new_ids[:, :length] = ids
    positions = torch.arange(width, device=device).repeat(rows, 1)
    real = torch.zeros((rows, width), dtype=torch.bool, device=device)
    real[:, :length] = mask.bool()
    causal = torch.tril(torch.ones((width, width), dtype=torch.bool, device=device))
    block = causal[None] & real[:, None, :]  # the training row as its own 2-D mask reads it
    block[:, length:, :] = False
    ends = [length] * rows
    columns: list[list[int]] = []
    for index, (row, (suffix, (start, shared))) in enumerate(zip(image_rows, suffixes)):
        first, last = ends[row], ends[row] + len(suffix)
        new_ids[row, first:last] = torch.tensor(suffix, dtype=ids.dtype, device=device)
        positions[row, first:last] = torch.arange(start + shared, start + shared + len(suffix), device=device)
        prefix = torch.zeros(width, dtype=torch.bool, device=device)
        prefix[start:start + shared] = mask[row, start:start + shared].bool()
        block[row, first:last] = prefix
        block[row, first:last, first:last] = causal[:len(suffix), :len(suffix)]
        count = int(live[index].sum())
        columns.append(list(range(last - count, last)))
        ends[row] = last
    block |= torch.eye(width, dtype=torch.bool, device=device)[None]  # padding attends to itself: no empty rows
    batch = {"input_ids": new_ids, "attention_mask": block[:, None], "position_ids": positions,
             "pixel_values": task["pixel_values"]}
    if "labels" in task:
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=task["labels"].dtype, device=device)
        labels[:, :length] = task["labels"]
        batch["labels"] = labels
    return Packed(batch, list(image_rows), columns)
