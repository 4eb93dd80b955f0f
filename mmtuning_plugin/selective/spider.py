"""SPIDER-style importance-masked updates (`selective: {method: spider, mask_ratio: r}`; ICML 2025, arXiv
2411.10928): each selected weight keeps a running sum of its gradient magnitudes (task importance); its
pre-trained magnitude is its general importance. At every optimizer step a weight may move only where its
normalised task importance exceeds its normalised general importance, and at most a share `r` of each tensor's
weights (the largest excess first). Everything else keeps its value exactly: the step is undone there.

Memory: one fp32 accumulator per trained weight, plus a snapshot of the trained weights during each step. The
pre-trained weight is not copied: PEFT's modules_to_save keeps it as the frozen original.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..names import module_of

logger = logging.getLogger("mmtuning.spider")

ACCUMULATOR_BYTES = 4  # fp32 running sum of |gradient| per trained weight
TINY = 1e-12


def extra_state_bytes(trained_params: int, param_bytes: int = 4) -> int:
    """SPIDER's memory beyond the optimizer: the accumulator, and the per-step snapshot of the trained weights."""
    return trained_params * (ACCUMULATOR_BYTES + param_bytes)


@dataclass
class MaskedTensor:
    name: str
    modality: str
    trained: nn.Parameter
    pretrained: torch.Tensor  # the frozen original's tensor (no copy)
    ratio: float
    accumulated: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    snapshot: Optional[torch.Tensor] = None


def importance_mask(accumulated: torch.Tensor, pretrained: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where a weight may move: task importance (accumulated |grad| / its max) exceeds general importance
    (|pretrained| / its max), keeping at most `ratio` of the tensor, those with the largest excess."""
    task = accumulated / accumulated.max().clamp_min(TINY)
    general = pretrained.abs().float()
    general = general / general.max().clamp_min(TINY)
    excess = (task - general).flatten()
    mask = excess > 0
    cap = math.ceil(ratio * excess.numel())
    if int(mask.sum()) > cap:
        keep = torch.topk(excess, cap).indices
        mask = torch.zeros_like(mask)
        mask[keep] = True
    return mask.view_as(accumulated)


@dataclass
class SpiderMask:
    """The masked tensors of a run, host-free: `before_step()` after the backward (gradients final, clipping
    done) and `after_step()` right after `optimizer.step()`."""

    tensors: list[MaskedTensor]
    applied: dict[str, list[float]] = field(default_factory=dict)  # modality -> applied share per step

    def before_step(self) -> None:
        for item in self.tensors:
            grad = item.trained.grad
            if grad is None:  # frozen this step by a schedule: it does not move anyway
                item.mask = None
                continue
            if item.accumulated is None:
                item.accumulated = torch.zeros_like(grad, dtype=torch.float32)
            item.accumulated.add_(grad.detach().abs().float())
            item.mask = importance_mask(item.accumulated, item.pretrained, item.ratio)
            grad.mul_(item.mask.to(grad.dtype))
            item.snapshot = item.trained.detach().clone()
        self._record()

    @torch.no_grad()
    def after_step(self) -> None:
        """Undo the step where the mask is off (Adam's momentum and weight decay would still move those)."""
        for item in self.tensors:
            if item.mask is not None and item.snapshot is not None:
                item.trained.copy_(torch.where(item.mask, item.trained, item.snapshot))
            item.snapshot = None

    def _record(self) -> None:
        counts: dict[str, list[int]] = {}
        for item in self.tensors:
            if item.mask is not None:
                pair = counts.setdefault(item.modality, [0, 0])
                pair[0] += int(item.mask.sum())
                pair[1] += item.mask.numel()
        for modality, (on, total) in counts.items():
            self.applied.setdefault(modality, []).append(on / total)

    def state_bytes(self) -> int:
        return sum(t.accumulated.numel() * ACCUMULATOR_BYTES for t in self.tensors if t.accumulated is not None)


def spider_mask(model: nn.Module, plan: Any, adapter_name: str = "default") -> Optional[SpiderMask]:
    """The SpiderMask of the plan's `spider` modules in a wrapped model (None when no modality uses spider)."""
    from peft.utils.other import ModulesToSaveWrapper

    chosen = {s.name: s for s in plan.selected if s.method == "spider"}
    if not chosen:
        return None
    tensors = []
    for name, module in model.named_modules():
        selected = chosen.get(module_of(name)) if isinstance(module, ModulesToSaveWrapper) else None
        if selected is None:
            continue
        ratio = plan.config.spec(selected.modality).selective.ratio
        copy, original = module.modules_to_save[adapter_name], module.original_module
        for local in selected.trained:
            tensors.append(MaskedTensor(f"{selected.name}.{local}", selected.modality, getattr(copy, local),
                                        getattr(original, local).detach(), ratio))
    return SpiderMask(tensors)


def spider_callback(session) -> Any:
    """A transformers TrainerCallback applying the session's SPIDER mask at every optimizer step and logging the
    share of weights it let move (`mmtuning_spider_mask_ratio/<modality>`, mean since the last log)."""
    from transformers import TrainerCallback

    class MMTuningSpiderCallback(TrainerCallback):
        def __init__(self):
            self.spider: Optional[SpiderMask] = None
            self.logged: dict[str, int] = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.spider = spider_mask(model, session.require_plan())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.spider is not None:
                self.spider.before_step()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.spider is not None:
                self.spider.after_step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.spider is None:
                return
            entry = {}
            for modality, values in self.spider.applied.items():
                new = values[self.logged.get(modality, 0):]
                if new:
                    entry[f"mmtuning_spider_mask_ratio/{modality}"] = sum(new) / len(new)
                self.logged[modality] = len(values)
            if entry:
                entry["mmtuning_spider_state_bytes"] = self.spider.state_bytes()
                state.log_history.append({"step": state.global_step, **entry})
                logger.info("mmtuning spider at step %d: %s", state.global_step, entry)

    return MMTuningSpiderCallback()
