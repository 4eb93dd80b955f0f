"""Training-step time of the demo recipe with `keep:` variants against the same recipe without keep.

    PYTHONPATH=. python bench/keep_overhead.py [--reps 6] [--block 5] [--threads 1]

One process, the demo's 4-bit tiny LLaVA, training batch 16 (the demo's), each variant its own wrapped model
and Trainer. Steps are interleaved: every repetition runs `--block` steps of each variant in turn, so load
from other processes hits all variants alike. A step is `Trainer.training_step` (task forward, extra terms,
backward) plus the optimizer step; keep runs at full weight (past its ramp). Reported: median step time and
its ratio to the recipe without keep: median wall time, and mean CPU time of this process (with one thread,
CPU time is the work done, far less touched by other processes on a shared machine than wall time; a mean,
because `every k` variants alternate cheap and dear steps). Goal of issue 13: <= 1.3x.
`fuse` and `refresh` (docs/keep.md) change only the cost; the variants without them are the keep term as it
ran before they existed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

COST_KEYS = ("batch_size", "every", "refresh", "fuse", "answer_tokens")  # default unless a variant sets them
VARIANTS: dict[str, dict | None] = {  # keep block per variant (None: the recipe without keep)
    "no keep": None,
    "kl, 8 rows": {"target": "kl", "batch_size": 8},
    "kl, 4 rows": {"target": "kl", "batch_size": 4},
    "kl, 4 rows, first token only": {"target": "kl", "batch_size": 4, "answer_tokens": 1},
    "kl, 2 rows": {"target": "kl", "batch_size": 2},
    "kl, 4 rows every 2 steps": {"target": "kl", "batch_size": 4, "every": 2},
    "answers, 4 rows": {"target": "answers", "batch_size": 4},
    "answers, 4 rows every 2 steps": {"target": "answers", "batch_size": 4, "every": 2},
    "kl, 4 rows every 4 steps": {"target": "kl", "batch_size": 4, "every": 4},
    "kl, 8 rows, fused": {"target": "kl", "batch_size": 8, "fuse": True},
    "kl, 8 rows, refresh 4": {"target": "kl", "batch_size": 8, "refresh": 4},
    "kl, 8 rows, fused, refresh 2 (recipe)": {"target": "kl", "batch_size": 8, "fuse": True, "refresh": 2},
    "kl, 8 rows, fused, refresh 4": {"target": "kl", "batch_size": 8, "fuse": True, "refresh": 4},
    "kl, 4 rows, fused, refresh 4": {"target": "kl", "batch_size": 4, "fuse": True, "refresh": 4},
    "kl, 4 rows, fused, refresh 8": {"target": "kl", "batch_size": 4, "fuse": True, "refresh": 8},
    "answers, 8 rows, fused": {"target": "answers", "batch_size": 8, "fuse": True},
    "answers, 8 rows, fused, refresh 2": {"target": "answers", "batch_size": 8, "fuse": True, "refresh": 2},
}


def build(name, keep, recipe, processor, rows, steps):
    from transformers import TrainingArguments

    from mmtuning_plugin.demo.model import training_batch
    from mmtuning_plugin.demo.runner import load_base
    from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_keep
    from mmtuning_plugin.session import MMTuning

    block = copy.deepcopy(recipe)
    block.pop("keep", None)
    if keep is not None:  # the recipe's prompts, target and weight; each variant says how it pays
        paid = {key: value for key, value in recipe.get("keep", {}).items() if key not in COST_KEYS}
        block["keep"] = {**paid, **keep}
    session = MMTuning(block)
    torch.manual_seed(0)
    model = session.wrap(load_base(__import__("mmtuning_plugin.demo.model", fromlist=["MODEL_DIR"]).MODEL_DIR, session, True))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=2e-3, report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    collate = lambda r: training_batch(r, processor.tokenizer.pad_token_id)  # noqa: E731
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=rows, mmtuning=session,
                              processing_class=processor, data_collator=collate)
    prepare_keep(trainer)
    if session.keep is not None:
        session.keep.total_steps = 1  # past the ramp: full weight on every measured step
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train() itself
    return {"name": name, "trainer": trainer, "model": model, "session": session, "collate": collate, "times": [],
            "step": 1}


def one_step(variant, batch) -> tuple[float, float]:
    trainer, model, keep = variant["trainer"], variant["model"], variant["session"].keep
    if keep is not None:
        keep.step, keep.micro = variant["step"], 0
    variant["step"] += 1
    started, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmtuning_plugin.demo.data import make_set
    from mmtuning_plugin.demo.model import MODEL_DIR, encode
    from mmtuning_plugin.demo.runner import _quiet_libraries, load_processor, load_recipes

    _quiet_libraries()
    processor = load_processor(MODEL_DIR)
    total = args.reps * args.block + args.warmup
    rows = encode(processor, make_set("target", "train", 16 * total, seed=0))
    recipe = load_recipes()["mmtuning"]["mmtuning"]
    variants = [build(name, VARIANTS[name], recipe, processor, rows, total) for name in args.variants]
    batches = [variants[0]["collate"](rows[i * 16:(i + 1) * 16]) for i in range(total)]
    for variant in variants:  # warm-up steps, not timed
        for index in range(args.warmup):
            one_step(variant, batches[index])
    for rep in range(args.reps):
        for variant in variants:
            for index in range(args.block):
                variant["times"].append(one_step(variant, batches[args.warmup + rep * args.block + index]))
    def median(variant, which):
        return statistics.median(t[which] for t in variant["times"])

    def mean(variant, which):
        return statistics.mean(t[which] for t in variant["times"])

    wall, cpu = median(variants[0], 0), mean(variants[0], 1)
    print(f"threads {args.threads}, {args.reps} x {args.block} interleaved steps per variant, batch 16, 4-bit demo model")
    print(f"{'variant':<32} {'wall s (median)':>15} {'ratio':>6} {'CPU s (mean)':>13} {'ratio':>6}")
    for variant in variants:
        print(f"{variant['name']:<32} {median(variant, 0):>15.4f} {median(variant, 0) / wall:>5.2f}x "
              f"{mean(variant, 1):>13.4f} {mean(variant, 1) / cpu:>5.2f}x")


if __name__ == "__main__":
    main()
