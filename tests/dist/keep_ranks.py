"""One rank of the 2-process `keep:` check (launched by tests/test_keep.py through torchrun, gloo backend).

The transformers Trainer integration trains the demo's tiny LLaVA with `keep: {target: kl}` and a layer schedule
that keeps language layers 0-2 frozen; the Trainer wraps the model in DistributedDataParallel and each rank gets
its own half of the data. Each rank saves its adapters before and after, and the logged keep values.
"""

import os
import sys

import torch
from ranks import leave_together
from transformers import TrainingArguments

from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.session import MMTuning

BLOCK = {"language": {"modules": "attention", "schedule": {"type": "custom", "stages": [{"at": 0, "layers": [3]}]}},
         "keep": {"prompts": ["what is the colour of the shape ?", "what shape is in the image ?"], "target": "kl",
                  "ramp": 0, "batch_size": 2}}


def run(out_dir: str, mode: str, steps: int = 3) -> None:
    torch.set_num_threads(1)
    processor = load_processor(MODEL_DIR)
    rows = encode(processor, make_set("target", "train", 8, seed=5))
    torch.manual_seed(0)  # identical adapter init on every rank (DDP also broadcasts rank 0's)
    session = MMTuning({**BLOCK, "keep": {**BLOCK["keep"], "fuse": mode == "fused"}})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=5e-3,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=0, data_seed=0, ddp_backend="gloo",
                             ddp_find_unused_parameters={"auto": None, "false": False, "fused": None}[mode])
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=rows, mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    trainer.train()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    keep = [e["loss_keep"] for e in trainer.state.log_history if "loss_keep" in e]
    torch.save({"before": before, "after": after, "keep": keep, "world_size": args.world_size,
                "wrapped": type(trainer.model_wrapped).__name__},
               os.path.join(out_dir, f"rank{os.environ['RANK']}_{mode}.pt"))


if __name__ == "__main__":
    # `auto`: the Trainer's default for a PeftModel (find_unused_parameters=True); `false`: every parameter DDP
    # holds must get its gradient through hooks, the keep forward's included; `fused`: the keep rows ride in the
    # training batch's DDP forward (`keep.fuse`).
    for mode in ("auto", "false", "fused"):
        run(sys.argv[1], mode)
    leave_together()
