"""`mmtune convert tailor` on the demo: E/F of plain LoRA's adapter before and after keeping a share of its delta.

    PYTHONPATH=. python bench/tailor.py --runs /tmp/paradigms --seeds 0 1 2 3 4 [--keep 0.1 0.05] [--out /tmp/tailor]

Reads the plain-LoRA adapters a `bench/paradigms.py` sweep saved (RUNS/seed<N>-plain_lora/plain_lora/adapter,
with their results.json for the base's and the adapter's scores), tailors each (by magnitude; by activation on 64
training rows of the new task; the same with compensation; by Fisher on the same rows), and scores the result on the demo's 128 + 128 held-out
items, 4-bit base as in training. One JSON line per (seed, variant, share) goes to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mmtuning_plugin.convert.tailor import tailor
from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.runner import evaluate_adapter
from mmtuning_plugin.scoring import efo

VARIANTS = {"magnitude": {"by": "magnitude"}, "activation": {"by": "activation", "calib": True},
            "activation+compensate": {"by": "activation", "calib": True, "compensate": True},
            "fisher": {"by": "fisher", "calib": True}}
CALIB_ROWS = 64


def calibration_set(out: Path, seed: int) -> Path:
    """64 rows of the demo's training stream for the seed, as an eval JSONL (what --calib reads)."""
    folder = out / f"calib{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, item in enumerate(make_set("target", "train", CALIB_ROWS, seed=seed)):
        item.image.save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "question": item.question, "answer": item.answer}))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/paradigms"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/tailor"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    for seed in args.seeds:
        run = args.runs / f"seed{seed}-plain_lora"
        adapter = run / "plain_lora" / "adapter"
        arm = json.loads((run / "results.json").read_text())["arms"]["plain_lora"]
        full = efo(arm["before"], arm["after"])
        print(f"{seed:>4} plain LoRA            E {full['E']:+6.1f} F {full['F']:+6.1f} O {full['O']:+6.1f}", flush=True)
        calib = calibration_set(args.out, seed)
        for name in args.variants:
            variant = VARIANTS[name]
            for share in args.keep:
                target = args.out / f"seed{seed}-{name}-{share}"
                shutil.rmtree(target, ignore_errors=True)
                summary = tailor(adapter, target, keep=share, by=variant["by"],
                                 calib=calib if variant.get("calib") else None,
                                 compensate=variant.get("compensate", False))
                scores = efo(arm["before"], evaluate_adapter(target))
                line = {"seed": seed, "variant": name, "keep": share, **scores, "full": full,
                        "relative_error": summary["total_relative_error"],
                        "output_relative_error": summary.get("total_output_relative_error")}
                with log.open("a") as handle:
                    handle.write(json.dumps(line) + "\n")
                print(f"{seed:>4} {name:<22} {share:<5} E {scores['E']:+6.1f} F {scores['F']:+6.1f} "
                      f"O {scores['O']:+6.1f}", flush=True)


if __name__ == "__main__":
    main()
