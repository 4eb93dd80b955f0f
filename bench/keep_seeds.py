"""E/F/O of `keep:` over seeds: plain LoRA, the demo recipe without keep, with `target: kl` and `target: answers`.

    PYTHONPATH=. python bench/keep_seeds.py --seeds 0 1 2 3 4 [--steps 400] [--out /tmp/keep-seeds]

Every arm is the demo's runner (same 4-bit base, training stream, steps, learning rate, 128 + 128 held-out
items); the variants differ only in their `mmtuning:` block, derived here from recipes.yaml's `mmtuning` arm.
One JSON line per (seed, arm) is appended to OUT/results.jsonl as soon as it is measured, so a partial sweep
keeps what ran. Goal of issue 13: with keep, F >= -5 and E >= +90 on every seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

from mmtuning_plugin.demo.runner import DemoSettings, load_recipes, run_demo


def variants(targets: list[str]) -> dict[str, dict]:
    recipes = load_recipes()
    recipe = recipes["mmtuning"]
    without = copy.deepcopy(recipe)
    without["mmtuning"].pop("keep", None)
    out = {"plain_lora": recipes["plain_lora"], "recipe_no_keep": without}
    for target in targets:
        arm = copy.deepcopy(recipe)
        arm["mmtuning"]["keep"] = {**recipe["mmtuning"].get("keep", {}), "target": target}
        out[f"recipe_keep_{target}"] = arm
    ramp_all = copy.deepcopy(recipe)  # the lead for slow seeds: the keep weight rises over all of training
    ramp_all["mmtuning"]["keep"] = {**recipe["mmtuning"].get("keep", {}), "target": "kl", "ramp": 1.0}
    out["recipe_keep_kl_ramp1"] = ramp_all
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--arms", nargs="+", default=None, help="subset of: plain_lora recipe_no_keep recipe_keep_kl recipe_keep_answers recipe_keep_kl_ramp1")
    parser.add_argument("--targets", nargs="+", default=["kl", "answers"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/keep-seeds"))
    args = parser.parse_args()
    recipes = variants(args.targets)
    arms = tuple(args.arms or recipes)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    print(f"{'seed':>4} {'arm':<20} {'target b->a':>13} {'general b->a':>13} {'E':>7} {'F':>7} {'O':>7}  "
          f"per question type (after)  s", flush=True)
    for seed in args.seeds:
        for arm in arms:  # one arm per run_demo call: each line is written as soon as it exists
            target = args.out / f"seed{seed}-{arm}"
            shutil.rmtree(target, ignore_errors=True)
            started = time.time()
            report = run_demo(DemoSettings(steps=args.steps, seed=seed, out=target, arms=(arm,), threads=args.threads),
                              recipes=recipes)
            result = report["arms"][arm]
            b, a = result["before"], result["after"]
            line = {"seed": seed, "arm": arm, "E": result["E"], "F": result["F"], "O": result["O"], "before": b,
                    "after": a, "seconds": time.time() - started, "steps": args.steps}
            with log.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
            kinds = " ".join(f"{k} {100 * v:.0f}" for k, v in a.get("by_question", {}).items())
            print(f"{seed:>4} {arm:<20} {100 * b['target']:>5.1f}->{100 * a['target']:<6.1f} "
                  f"{100 * b['general']:>5.1f}->{100 * a['general']:<6.1f} {result['E']:>+7.1f} {result['F']:>+7.1f} "
                  f"{result['O']:>+7.1f}  {kinds}  {line['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
