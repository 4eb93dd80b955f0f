"""Run by tests/test_deepspeed.py under `torchrun --nproc_per_node 2` (gloo, DeepSpeed's CPU accelerator): the
transformers Trainer's own `deepspeed` setting with ZeRO-3, the `mmtuning:` block on. Two runs (RUN: full or equal),
one launch each:

- `full`: the demo's tiny LLaVA, language 4-bit (`quant: balanced`), LoRA on vision, the projector trained whole,
  per-modality lr, keep; 3 steps; the gathered adapter saved by the Trainer (stage3_gather_16bit_weights_on_model_save);
- `equal`: a float32 tiny LLaVA, the same block minus quant and keep, micro-batch 1 per rank; the test trains the
  same global batch of 2 in one process and compares.

Each rank writes what it saw to OUT_DIR/<run>-rank<R>.pt; the adapters go to OUT_DIR/<run>-adapter/.
"""

import os
import sys

import torch
import torch.distributed as dist
from fsdp_ranks import SCHEDULED, tiny_run
from ranks import leave_together
from transformers import TrainingArguments

from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.session import MMTuning

STATIC = {**{k: v for k, v in SCHEDULED.items() if k != "language"},
          "language": {k: v for k, v in SCHEDULED["language"].items() if k != "schedule"}}  # ZeRO: no later stages
FULL = {**STATIC, "quant": "balanced",
        "keep": {"prompts": ["what is the colour of the shape ?", "what shape is in the image ?"], "ramp": 0,
                 "batch_size": 2}}
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}


def arguments(out_dir: str, batch: int, deepspeed: bool = True) -> TrainingArguments:
    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=3, learning_rate=5e-3,
                             weight_decay=0.1, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=0, data_seed=0, save_strategy="no",
                             train_sampling_strategy="sequential", **({"deepspeed": ZERO3} if deepspeed else {}))


def full_run(out_dir: str) -> None:
    processor = load_processor(MODEL_DIR)
    rows = encode(processor, make_set("target", "train", 16, seed=5))
    torch.manual_seed(0)
    session = MMTuning(FULL)
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=True))
    trainer = MMTuningTrainer(model=model, args=arguments(os.path.join(out_dir, "full"), 1), train_dataset=rows,
                              mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    trainer.train()
    report(out_dir, "full", trainer)


def equal_run(out_dir: str) -> None:
    report(out_dir, "equal", tiny_run(STATIC, lambda: arguments(os.path.join(out_dir, "equal"), 1))[1])


def report(out_dir: str, run: str, trainer) -> None:
    params = list(trainer.model.parameters())
    trainer.save_model(os.path.join(out_dir, f"{run}-adapter"))
    torch.save({"world_size": dist.get_world_size(), "wrapped": type(trainer.model_wrapped).__name__,
                "partitioned": sum(hasattr(p, "ds_id") for p in params), "params": len(params),
                "partitioned_4bit": sum(hasattr(m.weight, "ds_id") for m in trainer.model.modules()
                                        if type(m).__name__ == "Linear4bit"),
                "base_lrs": {g.get("name"): lr for g, lr in zip(trainer.optimizer.param_groups,
                                                                trainer.lr_scheduler.base_lrs)},
                "log": trainer.state.log_history},
               os.path.join(out_dir, f"{run}-rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    # one run per launch: a second DeepSpeed engine in the same process runs a partitioned conv without gathering it
    torch.set_num_threads(1)
    {"full": full_run, "equal": equal_run}[sys.argv[2]](sys.argv[1])
    leave_together()
