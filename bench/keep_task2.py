"""Keep on a second task of our own, through the Trainer API as a user writes it (examples/train_with_trainer.py):
yes/no questions about the demo model's pictures ("is the shape red ?"), answer words the base never gave.

    PYTHONPATH=. python bench/keep_task2.py --seeds 0 1 2 3 4 [--steps 500] [--jobs 2] [--out /tmp/keep-task2]

Per seed: 2,000 training rows and 64 + 64 held-out items written as a user's files (the target set: yes/no
questions on held-out pictures; the general set: the demo's colour and shape questions), then two runs of the
example's script, with keep's defaults (only `prompts:`, the colour and shape questions) and without keep, scored
by `mmtune eval` (E/F/O). One JSON line per (seed, arm) in OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ARMS = ("keep", "no_keep", "keep_lm_head")  # keep_lm_head: LoRA on lm_head too (docs/data.md: new answer words)


def write_data(out: Path, seed: int) -> None:
    from mmtuning_plugin.demo.data import COLOURS, TASKS, make_item, make_set

    (out / "images").mkdir(parents=True, exist_ok=True)
    colours = sorted(COLOURS)

    def yes_no(split: str, count: int, name: str) -> None:
        rng = random.Random(f"task2:{seed}:{split}")
        with open(out / f"{name}.jsonl", "w") as handle:
            for index in range(count):
                item = make_item("general", split, index, seed)
                truth = item.key[0]
                asked = truth if rng.random() < 0.5 else rng.choice([c for c in colours if c != truth])
                image = f"images/{name}{index}.png"
                item.image.save(out / image)
                handle.write(json.dumps({"image": image, "question": f"is the shape {asked} ?",
                                         "answer": "yes" if asked == truth else "no", "type": "yes/no"}) + "\n")

    yes_no("train", 2000, "train")
    yes_no("eval", 64, "target")
    kinds = {question: kind for question, kind in TASKS["general"]}
    with open(out / "general.jsonl", "w") as handle:
        for index, item in enumerate(make_set("general", "eval", 64, seed=seed)):
            image = f"images/general{index}.png"
            item.image.save(out / image)
            handle.write(json.dumps({"image": image, "question": item.question, "answer": item.answer,
                                     "type": kinds[item.question]}) + "\n")
    (out / "keep.txt").write_text("".join(f"{question}\n" for question, _ in TASKS["general"]))


def measure(seed: int, arm: str, steps: int, out: Path) -> dict:
    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    from keep_scale import example_module  # bench/ is on the path when this file runs

    example = example_module()
    data = out / f"data{seed}"
    if not (data / "keep.txt").exists():
        write_data(data, seed)
    block = {key: value for key, value in example.BLOCK.items() if key != "keep"}
    if arm.startswith("keep"):
        block["keep"] = {"prompts": (data / "keep.txt").read_text().splitlines()}
    if arm.endswith("lm_head"):
        block["language"] = {**block["language"], "include": ["lm_head"]}
    adapter = example.train(data, out / f"seed{seed}-{arm}", steps, block=block, seed=seed)
    result = CliRunner().invoke(app, ["eval", str(adapter), "--target", str(data / "target.jsonl"), "--general",
                                      str(data / "general.jsonl"), "--json"])
    report = json.loads(result.stdout)
    return {"seed": seed, "arm": arm, "E": report["E"], "F": report["F"], "O": report["O"], "steps": steps,
            "after_by_type": {k: v for s in report["sets"].values() for k, v in s["after_by_type"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--arms", nargs="+", default=["keep", "no_keep"], choices=ARMS)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/keep-task2"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # the data first, once per seed (every arm reads it)
        if not (args.out / f"data{seed}" / "keep.txt").exists():
            write_data(args.out / f"data{seed}", seed)
    print(f"{'seed':>4} {'arm':<12} {'E':>7} {'F':>7} {'O':>7}  accuracy after, per type", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(measure, seed, arm, args.steps, args.out) for seed in args.seeds for arm in args.arms]
        for future in as_completed(futures):
            line = future.result()
            with (args.out / "results.jsonl").open("a") as handle:
                handle.write(json.dumps(line) + "\n")
            kinds = " ".join(f"{k} {100 * v:.0f}" for k, v in line["after_by_type"].items())
            print(f"{line['seed']:>4} {line['arm']:<12} {line['E']:>+7.1f} {line['F']:>+7.1f} {line['O']:>+7.1f}  {kinds}",
                  flush=True)


if __name__ == "__main__":
    main()
