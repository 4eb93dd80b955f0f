"""Keep rows as model inputs: joined below a training batch, grown by one answer token, on the model's device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base_view import to_model  # noqa: F401  (the keep term's batches meet the model through it)

IGNORE_INDEX = -100  # a label without loss (a joined keep row's); probe.py's too, which keep cannot import (import circle)


def per_token(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with one entry per token (ids, token type ids, ...), the attention mask aside."""
    ids = batch["input_ids"]
    return {key: value for key, value in batch.items() if key != "attention_mask" and value.shape == ids.shape}


def joined_rows(task: dict[str, Any], keep: dict[str, torch.Tensor], pad_id: int) -> dict[str, Any] | None:
    """The training batch with the keep rows below it, every row right-padded to the longer length (padding at
    a row's end changes nothing before it under a causal mask, so each row reads as it did alone); keep rows
    get no labels. None when the two cannot be one batch: other inputs (token types, image masks the keep rows
    lack), per-image tensors of other shapes, or inputs that are not tensors."""
    if set(task) - {"labels"} != set(keep) or not all(isinstance(v, torch.Tensor) for v in task.values()):
        return None
    ids = task["input_ids"]
    length = max(ids.shape[1], keep["input_ids"].shape[1])
    token_keys = set(per_token(task)) | {"attention_mask"}
    joined: dict[str, Any] = {}
    for key, value in task.items():
        extra = keep[key].to(value.device, value.dtype) if key in keep else torch.full_like(keep["input_ids"], IGNORE_INDEX)
        if key in token_keys:
            fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            joined[key] = torch.cat([right_padded(value, length, fill), right_padded(extra, length, fill)])
        elif value.shape[1:] == extra.shape[1:]:
            joined[key] = torch.cat([value, extra])
        else:
            return None
    return joined


def right_padded(value: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    return torch.cat([value, value.new_full((value.shape[0], length - value.shape[1]), fill)], 1) \
        if value.shape[1] < length else value


def appended(batch: dict[str, torch.Tensor], tokens: torch.Tensor, attend: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with one more text token per row at the right end (`attend`: whether the row's mask covers
    it); other per-token inputs (token type ids) grow by a 0, the text type."""
    grown = {key: torch.cat([value, value.new_zeros(value.shape[0], 1)], 1) for key, value in per_token(batch).items()}
    grown["input_ids"][:, -1] = tokens.to(grown["input_ids"].dtype)
    mask = batch["attention_mask"]
    return {**batch, **grown, "attention_mask": torch.cat([mask, attend[:, None].to(mask.dtype)], 1)}


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel: keep forwards must not start a second DDP forward in one step (the
    keep graph still feeds the same parameters' gradients, reduced once by the task loss's backward)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
