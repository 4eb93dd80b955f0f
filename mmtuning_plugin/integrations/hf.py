"""The plain transformers `Trainer` integration.

    mm = MMTuning({"vision": {"layers": {"top": 4}}, "projector": {"r": 16}})
    model = mm.wrap(model)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=ds, mmtuning=mm)

`MMTuningTrainer` takes optimizer groups, callbacks and extra loss terms from the `MMTuning` session; it
holds no logic of its own, so Axolotl and LLaMA-Factory reuse exactly the same pieces.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..session import MMTuning


class MMTuningTrainerMixin:
    """The session's pieces for any `transformers.Trainer` subclass (ours below, Axolotl's own trainers):
    per-modality optimizer groups, extra loss terms added to the task loss, and their logging.

    Mixed in before the trainer class; reads the session from `self.mmtuning`.
    """

    mmtuning: MMTuning

    def create_optimizer(self, model=None):
        """Per-modality parameter groups from the session; the optimizer class and its kwargs stay the Trainer's."""
        if self.optimizer is None:
            self.optimizer = build_grouped_optimizer(self.mmtuning, model if model is not None else self.model, self.args)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        extras = self.mmtuning.extra_losses(model, inputs, outputs)
        logs = self.__dict__.setdefault("_mmtuning_logs", {})
        for name, value in extras.items():
            loss = loss + value
            logs.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each extra loss term since the last log under its own key (`loss_align/<name>`)."""
        for name, values in self.__dict__.get("_mmtuning_logs", {}).items():
            if values:
                logs[name] = sum(values) / len(values)
        self._mmtuning_logs = {}
        super().log(logs, *args, **kwargs)


def build_grouped_optimizer(session: MMTuning, model: torch.nn.Module, args: Any):
    """The optimizer `args` asks for (class and kwargs from the Trainer), over the session's modality groups."""
    groups = session.optimizer_groups(model, args.learning_rate, args.weight_decay)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs.pop("lr", None)
    return optimizer_cls(groups, lr=args.learning_rate, **optimizer_kwargs)


class MMTuningTrainer(MMTuningTrainerMixin, Trainer):
    def __init__(self, *args: Any, mmtuning: MMTuning, **kwargs: Any):
        self.mmtuning = mmtuning
        callbacks = list(kwargs.pop("callbacks", None) or []) + mmtuning.callbacks()
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._mmtuning_logs: dict[str, list[float]] = {}


def prepare_model(model: torch.nn.Module, config: Any = None) -> tuple[torch.nn.Module, MMTuning]:
    """Wrap `model` per the `mmtuning:` settings; returns the PeftModel and the session for the trainer."""
    session = MMTuning(config)
    return session.wrap(model), session
