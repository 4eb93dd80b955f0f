"""Run by tests/test_schedule.py under `torchrun --nproc_per_node 2` (gloo, CPU): a top_down schedule
crossing stage changes under DDP, with and without find_unused_parameters. Each rank writes its adapter
weights and the log of stages to OUT_DIR."""

import os
import sys

import torch
from ranks import leave_together
from transformers import TrainingArguments

from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model


def run(out_dir: str, find_unused: str) -> None:
    torch.manual_seed(0)
    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2)
    before = {}
    model, session = prepare_model(model, {
        "vision": {"layers": [0, 1, 2], "schedule": {"type": "top_down", "start": 1, "every": 4}},
        "projector": {"schedule": {"from": 1}},
        "language": {"schedule": {"type": "top_down", "start": 2, "step_layers": 1, "every": 2}, "lr": 0.5},
    })
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=1, max_steps=5, learning_rate=5e-3,
                             weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0,
                             ddp_backend="gloo", ddp_find_unused_parameters={"auto": None, "false": False}[find_unused])
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, 16),
                              data_collator=stack_rows, mmtuning=session)
    trainer.train()
    rank = int(os.environ["RANK"])
    after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    stages = [e for e in trainer.state.log_history if "mmtuning_stage" in e]
    torch.save({"before": before, "after": after, "stages": stages}, os.path.join(out_dir, f"rank{rank}_{find_unused}.pt"))


if __name__ == "__main__":
    # `auto`: the Trainer's default for a PeftModel (find_unused_parameters=True): stages toggle requires_grad.
    # `false`: find_unused_parameters=False: the scheduler only drops inactive grads before each step.
    for mode in ("auto", "false"):
        run(sys.argv[1], mode)
    leave_together()
