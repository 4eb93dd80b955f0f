"""The plain transformers `Trainer` integration: the host contract (session.PHASES) for a model you load.

    model, mm = from_pretrained(path, {"vision": {"layers": {"top": 4}}, "quant": "balanced"})
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=ds, mmtuning=mm)

or, for a model already loaded: `model, mm = prepare_model(model, block)`.

`MMTuningTrainer` takes optimizer groups, callbacks and extra loss terms from the `MMTuning` session; it
holds no logic of its own. `MMTuningTrainerMixin` carries those overrides so hosts whose trainers subclass
`Trainer` themselves (Axolotl's, LLaMA-Factory's `CustomSeq2SeqTrainer`) reuse exactly the same pieces.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..errors import MMTuningError
from ..session import MMTuning


class MMTuningTrainerMixin:
    """The session's pieces for any `transformers.Trainer` subclass (ours below, Axolotl's own trainers):
    per-modality optimizer groups, extra loss terms added to the task loss, and their logging.

    Mixed in before the trainer class; reads the session from `self.mmtuning`.
    """

    mmtuning: MMTuning

    def create_optimizer(self, model=None):
        """Per-modality parameter groups from the session; the optimizer class and its kwargs stay the Trainer's
        (or the host's `optimizer_cls_and_kwargs`: Axolotl's custom optimizers arrive that way)."""
        if self.optimizer is None:
            from ..sharding import is_sharded, resharded

            model = model if model is not None else self.model
            if is_sharded(model):  # the optimizer holds the shards, not a unit left gathered by an earlier forward
                resharded(model)
            self.optimizer = build_grouped_optimizer(self.mmtuning, model, self.args,
                                                     getattr(self, "optimizer_cls_and_kwargs", None))
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        joined = self.mmtuning.fuse_keep(model, inputs)  # `keep.fuse`: keep rows ride in this forward
        try:
            loss, outputs = super().compute_loss(model, joined, return_outputs=True, num_items_in_batch=num_items_in_batch)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            if joined is inputs or isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            self.mmtuning.unfuse_keep(error)
            joined = inputs
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        inputs = joined  # the loss terms read masks of the batch the forward saw
        # the log store lives in __dict__: host trainers (LLaMA-Factory's) never run MMTuningTrainer.__init__
        logs = self.__dict__.setdefault("_mmtuning_logs", {})
        loss = add_extra_losses(self, model, inputs, outputs, loss, num_items_in_batch, logs)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        """The contract's `trainer` phase, before the first step: the adapters still train exactly as planned
        (after every host option had its say); keep rows (and the base's answers) are built from the trainer's own
        processor and training data once the model is prepared (`KeepOnTrainBegin`)."""
        self.mmtuning.before_training(self.model)
        shard_where_accelerate_cannot(self)
        if self.mmtuning.keep is not None and not any(isinstance(c, KeepOnTrainBegin)
                                                      for c in self.callback_handler.callbacks):
            self.callback_handler.callbacks.insert(0, KeepOnTrainBegin(self))
        return super().train(*args, **kwargs)

    # --- a model mmtuning sharded (FSDP2 on CPU processes, sharding.py): save and resume --------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A sharded model's adapter, gathered into PEFT's plain format (every rank joins; the main one writes)."""
        from ..sharding import adapter_state_names, gathered_state, is_sharded

        if not is_sharded(self.model) or self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        state = gathered_state(self.model, adapter_state_names(self.model, self.optimizer))
        if self.args.should_save:
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Each rank writes its own shards of adapter and optimizer state (the Trainer would save rank 0's
        optimizer shard only); the main rank writes the scheduler."""
        from transformers.trainer import SCHEDULER_NAME

        from ..sharding import is_sharded, save_rank_state

        if not is_sharded(self.model) or self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_rank_state(self.model, self.optimizer, output_dir)
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), f"{output_dir}/{SCHEDULER_NAME}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume a sharded run from its own shards (PEFT's loader cannot copy full tensors into shards)."""
        from ..sharding import has_rank_state, is_sharded, load_rank_state

        if not is_sharded(self.model) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not has_rank_state(resume_from_checkpoint):
            raise MMTuningError(f"{resume_from_checkpoint}: holds no per-rank shards (mmtuning_fsdp/), so a sharded "
                                f"run cannot resume from it; resume from a checkpoint this sharded run wrote.")
        load_rank_state(self.model, None, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from transformers.trainer import SCHEDULER_NAME

        from ..sharding import is_sharded, load_rank_state

        if not is_sharded(self.model) or self.is_fsdp_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_rank_state(self.model, self.optimizer, checkpoint)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(torch.load(f"{checkpoint}/{SCHEDULER_NAME}", weights_only=True))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each extra loss term since the last log under its own key (`loss_align/<name>`)."""
        for name, values in self.__dict__.get("_mmtuning_logs", {}).items():
            if values:
                logs[name] = sum(values) / len(values)
        self._mmtuning_logs = {}
        super().log(logs, *args, **kwargs)


def shard_where_accelerate_cannot(trainer: Trainer) -> None:
    """FSDP2 asked for where accelerate would silently wrap DDP instead (CPU processes): refuse what cannot be
    sharded, shard the wrapped model with FSDP2 (sharding.shard), and let accelerate prepare it without DDP. A model
    the caller sharded already gets the same guard."""
    from ..sharding import check_deepspeed, check_fsdp, fsdp_request, is_sharded, shard, zero_stage

    request = fsdp_request(trainer.args)
    check_fsdp(request, trainer.mmtuning.config)
    check_deepspeed(zero_stage(getattr(trainer.args, "deepspeed", None)), trainer.mmtuning.config)
    if request is not None and not request.by_accelerate and not is_sharded(trainer.model):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MMTuningError("fsdp shards across the processes of a distributed run, and this one has none; launch "
                                "it with torchrun (or accelerate launch) on 2+ processes, or drop fsdp.")
        trainer.mmtuning.sharding = summary = shard(trainer.model)
        trainer.mmtuning.log(f"FSDP2 on {summary['world_size']} CPU processes: {summary['units']} units, "
                             f"{summary['sharded_parameters']} of {summary['parameters']} parameters sharded "
                             f"(accelerate shards only on GPUs)")
    if request is not None and request.by_accelerate and trainer.is_fsdp_enabled:
        trainer.mmtuning.sharding = {"fsdp_version": request.version, "sharded_by": "accelerate",
                                     "world_size": trainer.args.world_size}
    if is_sharded(trainer.model) and not trainer.is_fsdp_enabled:
        trainer.model_wrapped = trainer.model
        keep_accelerate_from_wrapping(trainer.accelerator)


def keep_accelerate_from_wrapping(accelerator: Any) -> None:
    """accelerate's `prepare_model` for a sharded model: autocast only, no DDP on top (on CPU processes it would
    wrap one, and DDP cannot hold DTensor parameters), no device move."""
    from ..sharding import is_sharded

    original = accelerator.prepare_model
    if getattr(original, "mmtuning_guard", False):
        return

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if is_sharded(model):
            return original(model, device_placement=False, evaluation_mode=True)
        return original(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    prepare_model.mmtuning_guard = True
    accelerator.prepare_model = prepare_model


def build_grouped_optimizer(session: MMTuning, model: torch.nn.Module, args: Any, chosen: Any = None):
    """The optimizer `args` asks for (class and kwargs from the Trainer, or `chosen`: the trainer's
    `optimizer_cls_and_kwargs`), over the session's modality groups."""
    groups = session.optimizer_groups(model, args.learning_rate, args.weight_decay)
    if chosen is not None:
        optimizer_cls, optimizer_kwargs = chosen[0], dict(chosen[1])
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise MMTuningError(f"the trainer's optimizer {getattr(optimizer_cls, '__name__', optimizer_cls)} is built "
                                f"by a factory from the whole model, so mmtuning's per-modality parameter groups could "
                                f"not apply; choose a plain optimizer (e.g. adamw_torch) with the `mmtuning:` block.")
    else:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs.pop("lr", None)
    return optimizer_cls(groups, lr=args.learning_rate, **optimizer_kwargs)


class MMTuningTrainer(MMTuningTrainerMixin, Trainer):
    """Give it the model wrapped by `mmtuning.wrap(model)`, or the unwrapped model: then it plans and wraps here,
    and under `layers: auto` the probe first scores the layers on the first batches of `train_dataset` as
    `data_collator` collates them."""

    def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 *rest: Any, mmtuning: MMTuning, **kwargs: Any):
        self.mmtuning = mmtuning
        refuse_own_optimizer(mmtuning, kwargs.get("optimizers"))
        if "adapters" not in mmtuning.phases and model is not None and not hasattr(model, "peft_config"):
            model = wrap_probed(mmtuning, model, args, train_dataset, data_collator)
        callbacks = list(kwargs.pop("callbacks", None) or []) + mmtuning.callbacks()
        super().__init__(model, args, data_collator, train_dataset, *rest, callbacks=callbacks, **kwargs)


def wrap_probed(session: MMTuning, model: torch.nn.Module, args: Any, dataset: Any, collate: Any):
    """`session.wrap` with the first training batches as the probe's data (read only under `layers: auto`)."""
    from transformers import TrainingArguments, default_data_collator

    args = args if args is not None else TrainingArguments(output_dir="trainer_output")
    batches = first_batches(dataset, collate or default_data_collator, args.per_device_train_batch_size) \
        if session.needs_probe() and dataset is not None else None
    if "loaded" not in session.phases:
        session.after_load(model, batches, seed=args.seed)
    wrapped = session.wrap(model, probe_batches=batches, seed=args.seed)
    if session.require_plan().probe is not None:
        from transformers.utils import logging

        logging.get_logger(__name__).info("mmtuning: layers: auto, probed: %s", session.plan.probe.describe())
    return wrapped


def refuse_own_optimizer(session: MMTuning, optimizers: Any) -> None:
    """An optimizer built by the caller (`optimizers=(opt, sched)`) never gets the per-modality groups: refused when
    the block asks for per-modality learning rates, which it would otherwise drop."""
    if not optimizers or optimizers[0] is None:
        return
    asked = [f"mmtuning.{m}.{key}" for m in ("vision", "projector", "language") for key in ("lr", "lr_decay")
             if key in session.config.spec(m).model_fields_set]
    if asked:
        raise MMTuningError(f"MMTuningTrainer(optimizers=...) brings its own optimizer, so {', '.join(asked)} would "
                            f"never apply; drop `optimizers=` (the Trainer builds the optimizer over mmtuning's groups "
                            f"from TrainingArguments.optim) or remove those settings.")


def extra_loss_scale(trainer: Trainer, num_items_in_batch: Any) -> float:
    """The factor that makes a per-micro-batch mean scale like the task loss under gradient accumulation.

    transformers divides the returned loss by the accumulation steps in `training_step` unless the task
    loss is already normalised by `num_items_in_batch` (the tokens of all micro-batches: model accepts
    loss kwargs, or a compute_loss_func). In that case the extra terms are divided here instead."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or \
            getattr(trainer, "compute_loss_func", None) is not None
    if not scaled or not trainer.model.training:
        return 1.0
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    return 1.0 / steps


def add_extra_losses(trainer: Trainer, model, inputs, outputs, loss, num_items_in_batch, logs: dict[str, list[float]]):
    """Task loss plus the session's extra terms, scaled like the task loss; logs each term's unscaled value.
    `MMTuningTrainerMixin.compute_loss` calls it, so every host trainer scales the terms the same way."""
    extras = trainer.mmtuning.extra_losses(model, inputs, outputs)
    if not extras:
        return loss
    scale = extra_loss_scale(trainer, num_items_in_batch)
    for name, value in extras.items():
        loss = loss + value.to(loss.dtype) * scale
        logs.setdefault(name, []).append(float(value.detach()))
    return loss


class KeepOnTrainBegin(TrainerCallback):
    """Builds the keep rows and the base's answers when training begins: after accelerate or DeepSpeed prepared
    the model, so under FSDP or ZeRO-3 each rank generates with its shards gathered as in training (before that, a
    rank may hold no weights yet: sharded loading, ZeRO-3's partitioned init). Runs before the other callbacks."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        prepare_keep(self.trainer)


def prepare_keep(trainer: Trainer) -> Any:
    """`MMTuning.prepare_keep` with what a Trainer holds: its processing class (unless the host handed one to
    `use_keep_template`) and the first training rows collated as the trainer does, read in dataset order so the
    training stream's shuffling is untouched."""
    session = trainer.mmtuning
    if session.keep is None:
        return None
    processor = session.keep_template.get("processor", getattr(trainer, "processing_class", None))
    return session.prepare_keep(trainer.model, processor, training_batches=training_batches(trainer),
                                total_steps=trainer.args.max_steps if trainer.args.max_steps > 0 else None)


def training_batches(trainer: Trainer):
    """Collated batches of the training set's first rows, in order (no sampler, no RNG draw)."""
    return first_batches(trainer.train_dataset, trainer.data_collator, trainer.args.per_device_train_batch_size)


def first_batches(dataset: Any, collate: Any, size: int):
    """`dataset`'s rows in order, collated `size` at a time (a generator: only the batches read are built)."""
    if dataset is None:
        return
    rows = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)


def prepare_model(model: torch.nn.Module, config: Any = None, probe_batches: Any = None,
                  seed: int = 0) -> tuple[torch.nn.Module, MMTuning]:
    """The contract's `loaded` and `adapters` phases for a model you loaded: its quantization checked against
    `quant:` and mmtuning's k-bit preparation applied (under a policy that quantizes), then wrapped per the plan.
    Returns the PeftModel and the session for the trainer. `config`: the block, or a session. `probe_batches`:
    collated training batches for `layers: auto` (or hand the unwrapped model to MMTuningTrainer)."""
    session = config if isinstance(config, MMTuning) else MMTuning(config)
    session.after_load(model, probe_batches, seed)
    return session.wrap(model, probe_batches=probe_batches, seed=seed), session


def from_pretrained(path: Any, config: Any = None, model_class: Any = None, probe_batches: Any = None,
                    seed: int = 0, **kwargs: Any) -> tuple[torch.nn.Module, MMTuning]:
    """Load `path` the way the `mmtuning:` block says (its `quant:` policy as the BitsAndBytesConfig: the `load`
    phase), then `prepare_model`. `model_class` defaults to AutoModelForImageTextToText; `kwargs` go to
    `from_pretrained` (a `quantization_config` of your own is refused next to `quant:`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    session = config if isinstance(config, MMTuning) else MMTuning(config)
    loader = session.loader_kwargs(AutoConfig.from_pretrained(path))
    if loader and kwargs.get("quantization_config") is not None:
        raise MMTuningError("from_pretrained: both `quantization_config=` and `mmtuning.quant` say how to quantize; "
                            "drop quantization_config (mmtuning builds it from the policy) or remove `quant:`.")
    model = (model_class or AutoModelForImageTextToText).from_pretrained(path, **{**kwargs, **loader})
    return prepare_model(model, session, probe_batches, seed)
