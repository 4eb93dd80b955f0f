"""What each adapter method costs per optimizer step in a single-GPU user's shape: micro-batch 1 with gradient
accumulation, hundreds of image tokens per row, answers of dozens of tokens. CPU time per step, ratio to LoRA.

    PYTHONPATH=. python bench/method_scale.py --accum 8 --image 576 --answer 48

The model, rows and interleaved timing are bench/keep_scale.py's (random LLaVA, 576 image tokens, a Llama language
model of hidden 384 x 4 layers, float32, one thread), without keep; the methods differ only in their block, all on
the projector and the language model's attention.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from keep_scale import build_model, collate, optimizer_step, rows_for  # noqa: E402 (bench/ is on sys.path)

TARGETS = {"language": {"modules": "attention"}, "projector": {}}
METHODS: dict[str, dict] = {
    "lora r16": {},
    "lora r16, init milora (2r factors)": {"init": "milora"},
    "moe-lora 4 experts x r8": {"method": {"name": "moe-lora", "experts": 4}, "r": 8, "alpha": 16},
    "moe-lora 4 experts x r16": {"method": {"name": "moe-lora", "experts": 4}},
    "adapter (width 16, after each block)": {"method": "adapter", "language": {}},
}


def build(name: str, block: dict, args, rows) -> dict:
    from transformers import TrainingArguments

    from mmtuning_plugin.integrations.hf import MMTuningTrainer
    from mmtuning_plugin.session import MMTuning

    model, processor = build_model(args.image)
    session = MMTuning({**TARGETS, **block})
    model = session.wrap(model)
    training = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=10, per_device_train_batch_size=1,
                                 gradient_accumulation_steps=args.accum, learning_rate=1e-4, report_to="none",
                                 use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    pad = processor.tokenizer.pad_token_id
    trainer = MMTuningTrainer(model=model, args=training, train_dataset=rows, mmtuning=session,
                              processing_class=processor, data_collator=lambda r: collate(r, pad))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = args.accum
    return {"name": name, "trainer": trainer, "model": model, "keep": None, "pad": pad, "times": [], "step": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--image", type=int, default=576)
    parser.add_argument("--answer", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, processor = build_model(args.image)
    side = int(round(args.image ** 0.5)) * 14
    rows = rows_for(processor, args.accum * (args.reps + 1), args.answer, side)
    variants = [build(name, block, args, rows) for name, block in METHODS.items()]
    pad = variants[0]["pad"]
    steps = [[collate(rows[s * args.accum + m: s * args.accum + m + 1], pad) for m in range(args.accum)]
             for s in range(args.reps + 1)]
    for variant in variants:
        optimizer_step(variant, steps[0])  # warm-up
    for step in steps[1:]:
        for variant in variants:
            variant["times"].append(optimizer_step(variant, step))
    print(f"micro-batch 1, accumulation {args.accum}, {args.image} image tokens, {args.answer}-token answers "
          f"({len(rows[0]['input_ids'])} tokens per row); {args.reps} interleaved steps per method")
    base = statistics.mean(variants[0]["times"])
    for variant in variants:
        mean = statistics.mean(variant["times"])
        trainable = sum(p.numel() for p in variant["model"].parameters() if p.requires_grad)
        print(f"  {variant['name']:<40} {trainable:>9,} trainable {mean:7.3f} s/step  {mean / base:5.2f}x")


if __name__ == "__main__":
    main()
