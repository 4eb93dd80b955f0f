"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): the transformers Trainer's own FSDP2
switch (`fsdp: full_shard`, `fsdp_config: {fsdp_version: 2}`) with the `mmtuning:` block fully on. On CPU processes
accelerate would wrap DDP and shard nothing; mmtuning shards the model itself. Three runs, one model each:

- `full`: the demo's tiny LLaVA, language 4-bit (`quant: balanced`), LoRA on vision, the projector trained whole
  (selective), a top-down language schedule (layer 3, then 2-3 from step 2; 0-1 stay frozen), per-modality lr,
  keep; 4 steps, a checkpoint every 2;
- `resumed`: the same run resumed from `full`'s step-2 checkpoint (mid-schedule) to step 4;
- `equal`: a float32 tiny LLaVA with the same block minus quant and keep, micro-batch 1 per rank; the test trains the
  same global batch of 2 in one process and compares;
- `accumulated`: the same with 2 accumulated micro-batches per step (reduced once per step: `no_sync`).

Each rank writes what it saw to OUT_DIR/<run>-rank<R>.pt; rank 0 also writes the gathered adapter (<run>-adapter/).
"""

import os
import sys

import torch
import torch.distributed as dist
from ranks import leave_together
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.sharding import adapter_state_names, gathered_state
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

SCHEDULED = {"vision": {"layers": {"top": 2}}, "projector": {"selective": "full"},
             "language": {"modules": "attention", "lr": 0.5,
                          "schedule": {"type": "top_down", "start": 1, "step_layers": 1, "every": 2}},
             "dropout": 0.0}
FULL = {**SCHEDULED, "quant": "balanced",
        "keep": {"prompts": ["what is the colour of the shape ?", "what shape is in the image ?"], "ramp": 0,
                 "batch_size": 2}}


def arguments(out_dir: str, batch: int, steps: int = 4, fsdp: bool = True, **extra) -> TrainingArguments:
    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=5e-3, weight_decay=0.1, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0,
                             train_sampling_strategy="sequential",
                             **({"fsdp": True, "fsdp_config": {"fsdp_version": 2}, "ddp_backend": "gloo"} if fsdp else {}),
                             **extra)


def lora_state(model) -> dict:
    """Every adapter tensor, gathered (a collective under FSDP: every rank calls it)."""
    return gathered_state(model, adapter_state_names(model))


def full_run(out_dir: str, run: str, resume: str | None = None) -> None:
    processor = load_processor(MODEL_DIR)
    rows = encode(processor, make_set("target", "train", 16, seed=5))
    torch.manual_seed(0)
    session = MMTuning(FULL)
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=True))
    before = {n: t.clone() for n, t in gathered_state(model, adapter_state_names(model)).items()}
    args = arguments(os.path.join(out_dir, run), 1, save_strategy="steps", save_steps=2)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=rows, mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    trainer.train(resume_from_checkpoint=resume)
    report(out_dir, run, trainer, before)


def tiny_run(block: dict, arguments_of) -> tuple[dict, MMTuningTrainer]:
    """The `equal` scenario, sharded or in one process: a float32 tiny LLaVA (seed 0) wrapped with `block`, trained
    by MMTuningTrainer under `arguments_of()` on one repeated batch of 2 rows. Returns the adapter state before, and
    the trainer. The arguments are made after the model: with a DeepSpeed config alive, transformers would build the
    model already partitioned (ZeRO-3 init), which the batch builder's forward cannot run."""
    torch.manual_seed(0)
    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2)
    session = MMTuning(block)
    model = session.wrap(model)
    before = lora_state(model)
    trainer = MMTuningTrainer(model=model, args=arguments_of(), train_dataset=RepeatedBatch(batch.inputs, 16),
                              data_collator=stack_rows, mmtuning=session)
    trainer.train()
    return before, trainer


def gaps(single: dict, sharded: dict, before: dict) -> tuple[float, float]:
    """How far the one-process adapter moved from its start, and how far the sharded one is from it."""
    assert single.keys() == sharded.keys()
    return (max(float((single[k] - before[k]).abs().max()) for k in single),
            max(float((single[k] - sharded[k]).abs().max()) for k in single))


def equal_run(out_dir: str, run: str = "equal", accumulation: int = 1) -> None:
    before, trainer = tiny_run(SCHEDULED, lambda: arguments(os.path.join(out_dir, run), 1, save_strategy="no",
                                                            gradient_accumulation_steps=accumulation))
    report(out_dir, run, trainer, before)


def report(out_dir: str, run: str, trainer, before: dict) -> None:
    model = trainer.model
    after = lora_state(model)
    params = list(model.named_parameters())
    trainer.save_model(os.path.join(out_dir, f"{run}-adapter"))
    torch.save({"world_size": dist.get_world_size(), "wrapped": type(trainer.model_wrapped).__name__,
                "dtensor": sum(isinstance(p, DTensor) for _, p in params), "params": len(params),
                "linear4bit": [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"
                               and isinstance(m.weight, DTensor)],
                "before": before, "after": after, "log": trainer.state.log_history},
               os.path.join(out_dir, f"{run}-rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    full_run(out, "full")
    full_run(out, "resumed", resume=os.path.join(out, "full", "checkpoint-2"))
    equal_run(out)
    equal_run(out, "accumulated", accumulation=2)
    leave_together()
