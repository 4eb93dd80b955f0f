"""What `layers: auto` costs: the probe on N batches against N training steps of the plan it produces.

    PYTHONPATH=. python bench/probe_cost.py [--reps 5] [--batches 4] [--batch-size 16] [--four-bit] [--threads 1]

On the demo's tiny LLaVA (mmtuning_plugin/demo/assets), with the demo's training rows. Per rep, interleaved:
the probe (`probe_layers`, `language: {auto: {top_k: 2}}, vision: {auto: {top_k: 1}}`) on `--batches` batches,
then `--batches` full training steps (forward, backward, AdamW step) of the wrapped model on the same batches.
Reported: the median times and their ratio, the probe's cost in training steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIG = {"vision": {"layers": {"auto": {"top_k": 1}}}, "language": {"layers": {"auto": {"top_k": 2}}}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--four-bit", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmtuning_plugin.demo.data import make_set
    from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
    from mmtuning_plugin.demo.runner import load_base, load_processor
    from mmtuning_plugin.probe import probe_layers
    from mmtuning_plugin.session import MMTuning

    processor = load_processor(MODEL_DIR)
    pad = processor.tokenizer.pad_token_id
    rows = encode(processor, make_set("target", "train", args.batches * args.batch_size))
    batches = [training_batch(rows[i: i + args.batch_size], pad) for i in range(0, len(rows), args.batch_size)]
    config = {**CONFIG, **({"quant": "all-4bit"} if args.four_bit else {})}

    probe_model = load_base(MODEL_DIR, MMTuning(config), args.four_bit)
    session = MMTuning(config)
    trained = session.wrap(load_base(MODEL_DIR, session, args.four_bit), probe_batches=batches)
    trained.train()
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)

    def probe() -> None:
        probe_layers(probe_model, config, batches)

    def steps() -> None:
        for batch in batches:
            trained(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    probe(), steps()  # warm-up
    times: dict[str, list[float]] = {"probe": [], "steps": []}
    for _ in range(args.reps):
        for name, work in (("probe", probe), ("steps", steps)):
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    probe_s, steps_s = statistics.median(times["probe"]), statistics.median(times["steps"])
    print(f"demo tiny LLaVA, {'4-bit NF4' if args.four_bit else 'fp32'}, {args.batches} batches of {args.batch_size}, "
          f"{args.threads} thread(s), {args.reps} reps; chosen: {session.plan.probe.describe()}")
    print(f"probe on {args.batches} batches: median {probe_s:.3f} s")
    print(f"{args.batches} training steps:    median {steps_s:.3f} s")
    print(f"probe / training steps: {probe_s / steps_s:.2f}x (the probe costs about "
          f"{args.batches * probe_s / steps_s:.1f} training steps)")


if __name__ == "__main__":
    main()
