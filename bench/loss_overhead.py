"""Step-time overhead of each alignment loss relative to the task loss alone, side by side in one run.

    python bench/loss_overhead.py --threads 1           # CPU, the tests' tiny llava
    python bench/loss_overhead.py --device cuda --dtype bf16 --size medium

One identical model copy per variant (task alone, +anchor, +contrastive, +sculpt, +multiscale); the
variants' training steps (forward, loss, backward, AdamW step) are interleaved rep by rep in a shuffled
order, so machine noise hits all of them alike. Reports the median step time, its ratio to the task-only
median, the median and quartiles of the per-rep paired ratio (variant step / task step of the same rep),
and (CUDA) the peak memory of a step.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model

VARIANTS = {
    "task": {},
    "anchor": {"anchor": {"weight": 0.1}},
    "contrastive": {"contrastive": {"weight": 0.05}},
    "sculpt": {"sculpt": {"weight": 1e-3}},
    "multiscale": {"multiscale": {"weight": 0.1, "of": "anchor", "layers": [-1, -2]}},
}
# Model sizes (tiny_model overrides): big enough that a step is not pure Python overhead.
SIZES = {
    "tiny": {},  # the test-suite's model: Python overhead dominates, so ratios here are an upper bound
    "small": {"text_config.hidden_size": 256, "text_config.intermediate_size": 688, "text_config.head_dim": 32,
              "text_config.num_attention_heads": 8, "text_config.num_key_value_heads": 4,
              "vision_config.hidden_size": 128, "vision_config.intermediate_size": 512,
              "vision_config.image_size": 64, "vision_config.patch_size": 8, "image_seq_length": 64},
    "medium": {"text_config.hidden_size": 1024, "text_config.intermediate_size": 2816, "text_config.head_dim": 64,
               "text_config.num_attention_heads": 16, "text_config.num_key_value_heads": 8,
               "text_config.num_hidden_layers": 8, "vision_config.hidden_size": 512,
               "vision_config.intermediate_size": 2048, "vision_config.num_attention_heads": 8,
               "vision_config.image_size": 224, "vision_config.patch_size": 14, "image_seq_length": 256},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    base = tiny_model("llava", dtype=DTYPES[args.dtype], **SIZES[args.size])
    batch = tiny_batch(base, batch=args.batch, text_len=args.text_len).inputs
    batch = {k: (v.to(DTYPES[args.dtype]) if v.is_floating_point() else v).to(args.device) for k, v in batch.items()}
    runs = {}
    for name, losses in VARIANTS.items():
        session = MMTuning({"vision": {"layers": {"top": 2}}, "dropout": 0.0, "losses": losses})
        model = session.wrap(copy.deepcopy(base)).to(args.device)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, session, optimizer)
    return runs, batch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(model, session, optimizer, batch, device):
    """One training step; returns (seconds, peak bytes or None)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    outputs = model(**batch)
    loss = outputs.loss
    for value in session.extra_losses(model, batch, outputs).values():
        loss = loss + value
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, (torch.cuda.max_memory_allocated() if device == "cuda" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, batch = build(args)
    times = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    order = list(runs)
    shuffler = random.Random(0)
    for rep in range(args.warmup + args.reps):
        shuffler.shuffle(order)
        for name in order:
            seconds, peak = step(*runs[name], batch, args.device)
            if rep >= args.warmup:
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak or 0)
    base = statistics.median(times["task"])
    rows = []
    for name, t in times.items():
        # paired: each rep's step against the task-only step of the same rep (drift in machine load cancels)
        paired = sorted(v / b for v, b in zip(t, times["task"]))
        quartiles = statistics.quantiles(paired, n=4)
        rows.append({"variant": name, "median_ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base,
                     "paired_ratio": statistics.median(paired), "paired_p25": quartiles[0], "paired_p75": quartiles[2],
                     "peak_mib": peaks[name] / 2**20 if args.device == "cuda" else None})
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return
    print(f"device={args.device} dtype={args.dtype} size={args.size} batch={args.batch} text_len={args.text_len} "
          f"reps={args.reps} (interleaved, shuffled; {args.warmup} warm-up reps dropped)")
    print(f"{'variant':<12} {'median ms':>10} {'vs task':>8} {'paired':>7} {'p25-p75':>13} {'peak MiB':>9}")
    for row in rows:
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
        spread = f"{row['paired_p25']:.3f}-{row['paired_p75']:.3f}"
        print(f"{row['variant']:<12} {row['median_ms']:>10.1f} {row['ratio']:>8.3f} {row['paired_ratio']:>7.3f} "
              f"{spread:>13} {peak:>9}")


if __name__ == "__main__":
    main()
