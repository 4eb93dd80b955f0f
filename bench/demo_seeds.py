"""`mmtune demo` over several seeds: E/F/O per arm and seed, plus wall and CPU time of each run.

    PYTHONPATH=. python bench/demo_seeds.py --seeds 0 1 2 [--steps 150] [--out /tmp/demo-seeds]

Each seed runs in a fresh process (`python -m mmtuning_plugin.cli demo --json`), timed from outside
with resource usage of the child (user + system CPU seconds), so the numbers include imports and loading,
exactly what a user waits for. CPU only: the demo is a CPU demo (there is no `--device`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mmtuning_plugin.demo.runner import DemoSettings


def run_seed(seed: int, steps: int, out: Path, threads: int) -> dict:
    target = out / f"seed{seed}"
    shutil.rmtree(target, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "mmtuning_plugin.cli", "demo", "--json", "--seed", str(seed),
                           "--steps", str(steps), "--threads", str(threads), "--out", str(target)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    report = json.loads(done.stdout)
    report["wall_s"] = wall
    report["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DemoSettings.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmtune-demo-seeds"))
    args = parser.parse_args()
    rows = []
    print(f"{'seed':>4} {'arm':<12} {'target b->a':>14} {'general b->a':>14} {'E':>7} {'F':>7} {'O':>7}  wall/cpu s")
    for seed in args.seeds:
        report = run_seed(seed, args.steps, args.out, args.threads)
        for name, arm in report["arms"].items():
            b, a = arm["before"], arm["after"]
            rows.append((seed, name, arm["E"], arm["F"], arm["O"]))
            print(f"{seed:>4} {name:<12} {100 * b['target']:>6.1f}->{100 * a['target']:<6.1f} "
                  f"{100 * b['general']:>6.1f}->{100 * a['general']:<6.1f} {arm['E']:>+7.1f} {arm['F']:>+7.1f} "
                  f"{arm['O']:>+7.1f}  {report['wall_s']:.0f}/{report['cpu_s']:.0f}", flush=True)
    for name in dict.fromkeys(r[1] for r in rows):
        values = [r for r in rows if r[1] == name]
        print(f"mean {name:<12} E {statistics.mean(v[2] for v in values):+.1f}  F {statistics.mean(v[3] for v in values):+.1f}  "
              f"O {statistics.mean(v[4] for v in values):+.1f}")


if __name__ == "__main__":
    main()
