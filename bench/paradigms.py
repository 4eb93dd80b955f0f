"""The survey's three tuning paradigms on the demo: E/F/O, trainable parameters and step time per method,
each with and without `keep:`.

    PYTHONPATH=. python bench/paradigms.py --seeds 0 1 2 [--steps 500] [--jobs 2] [--out /tmp/paradigms]
    PYTHONPATH=. python bench/paradigms.py --summarize /tmp/paradigms/results.jsonl [--tailor /tmp/tailor/results.jsonl]

Every arm is the demo's runner (`mmtune demo`'s 4-bit tiny LLaVA, training stream, steps, learning rate and
128 + 128 held-out items); the methods differ only in their `mmtuning:` block (METHODS below). "+ keep" adds
the demo recipe's `keep:` block unchanged. One JSON line per (seed, arm) goes to OUT/results.jsonl as soon as
it exists. Step time is training only (evaluations excluded), wall and CPU seconds of the arm's process.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from keep_seeds import measure  # noqa: E402  (bench/ is on sys.path when run as a script)

from mmtuning_plugin.demo.runner import DemoSettings, load_recipes

LAST_LANGUAGE_LAYER = "model.language_model.layers.3"  # the demo model has 4 language layers

# paradigm, method -> the mmtuning: block (None: take it from recipes.yaml by that name)
METHODS: dict[str, tuple[str, dict | None]] = {
    "plain_lora": ("reparameterization", None),
    "mmtuning": ("reparameterization", None),
    "ia3": ("additive", {"method": "ia3", "vision": False, "projector": {}, "language": {"modules": "all-linear"}}),
    "layernorm": ("selective", {"vision": False, "projector": {"selective": "full"}, "language": {"selective": "layernorm"}}),
    "bias": ("selective", {"vision": {"selective": "bias", "layers": {"top": 1}}, "projector": {"selective": "bias"},
                           "language": {"selective": "layernorm"}}),
    "top1_full": ("selective", {"vision": False, "projector": {"selective": "full"},
                                "language": {"selective": "full", "layers": {"top": 1}},
                                "quant": {"preset": "balanced", "keep_16bit": [LAST_LANGUAGE_LAYER]}}),
    "spider": ("selective", {"vision": False, "projector": {"selective": "full"},
                             "language": {"selective": {"method": "spider", "mask_ratio": 0.1}, "layers": {"top": 1}},
                             "quant": {"preset": "balanced", "keep_16bit": [LAST_LANGUAGE_LAYER]}}),
    "layers_auto": ("reparameterization", None),  # the recipe with `language.layers: {auto: {top_k: 2}}`
    # Bottleneck adapters after each language block's attention and MLP and after the projector (width 16).
    "adapter": ("additive", {"method": "adapter", "vision": False, "projector": {}, "language": {}}),
    # MMtuning's tuner: 4 LoRA experts (r 8) per language attention projection and projector Linear, routed by an
    # image router on image tokens and a text router on the others; the load-balance term at 0.01.
    "moe_lora": ("reparameterization", {"method": {"name": "moe-lora", "experts": 4}, "vision": False, "projector": {},
                                        "language": {"modules": "attention"}, "r": 8, "alpha": 16}),
    # Calibrated starts (reparameterization by calibration) on plain LoRA's block: every LoRA module starts from its
    # base weight's principal (PiSSA) or minor (MiLoRA) singular components, its QR (OLoRA), or the principal
    # components of W times its inputs' covariance on the first 8 training batches (CorDA).
    **{f"plain_lora_{init}": ("reparameterization (calibration)", None) for init in ("pissa", "milora", "olora", "corda")},
}


def arms(keep_ramp: float | None = None) -> dict[str, dict]:
    recipes = load_recipes()
    keep = dict(recipes["mmtuning"]["mmtuning"]["keep"])
    if keep_ramp is not None:
        keep["ramp"] = keep_ramp
    out: dict[str, dict] = {}
    for name, (paradigm, block) in METHODS.items():
        if block is None:
            source = "mmtuning" if name == "layers_auto" else "plain_lora" if name.startswith("plain_lora_") else name
            block = copy.deepcopy(recipes[source]["mmtuning"])
            if name == "layers_auto":
                block["language"] = {**block["language"], "layers": {"auto": {"top_k": 2}}}
            if name.startswith("plain_lora_"):
                block["init"] = name.removeprefix("plain_lora_")
        block = {k: v for k, v in copy.deepcopy(block).items() if k != "keep"}
        if "quant" not in block and not name.startswith("plain_lora"):
            block["quant"] = "balanced"
        out[name] = {"label": name, "paradigm": paradigm, "mmtuning": block}
        out[f"{name}+keep"] = {"label": f"{name} + keep", "paradigm": paradigm, "mmtuning": {**block, "keep": keep}}
    return out


def summary_table(results: Path, tailor: Path | None = None) -> str:
    """Markdown: per method, mean over seeds of trainable, CPU s / step and E / F / O, without and with keep, and
    on how many seeds E >= +90 and F >= -5 (the demo's goal); plus the tailored rows of bench/tailor.py."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731

    def cells(runs: list[dict]) -> str:
        if not runs:
            return "- | - | -"
        goal = sum(r["E"] >= 90 and r["F"] >= -5 for r in runs)
        return (f"{mean(runs, 'step_cpu_seconds'):.3f} | {mean(runs, 'E'):+.1f} / {mean(runs, 'F'):+.1f} / "
                f"**{mean(runs, 'O'):+.1f}** | {goal} of {len(runs)}")

    lines = ["| paradigm | method | trainable | CPU s / step | E / F / O | goal met | CPU s / step with keep | "
             "E / F / O with keep | goal met with keep |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (paradigm, _) in METHODS.items():
        plain, kept = by_arm.get(name, []), by_arm.get(f"{name}+keep", [])
        if plain or kept:
            trainable = (plain or kept)[0]["trainable_params"]
            lines.append(f"| {paradigm} | {name} | {trainable:,} | {cells(plain)} | {cells(kept)} |")
    if tailor is not None and tailor.is_file():
        tailored: dict[tuple, list[dict]] = {}
        for line in tailor.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                tailored.setdefault((row["variant"], row["keep"]), []).append(row)
        for (variant, share), runs in sorted(tailored.items(), key=lambda item: (item[0][0], -item[0][1])):
            goal = sum(r["E"] >= 90 and r["F"] >= -5 for r in runs)
            lines.append(f"| selective (posterior) | plain_lora, tailor {variant} {share:g} | - | - | "
                         f"{mean(runs, 'E'):+.1f} / {mean(runs, 'F'):+.1f} / **{mean(runs, 'O'):+.1f}** | "
                         f"{goal} of {len(runs)} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DemoSettings.steps)
    parser.add_argument("--arms", nargs="+", default=None, help=f"subset of {list(arms())}")
    parser.add_argument("--jobs", type=int, default=2, help="(seed, arm) runs at once, one process each")
    parser.add_argument("--keep-ramp", type=float, default=None, help="replace the recipe keep block's ramp")
    parser.add_argument("--out", type=Path, default=Path("/tmp/paradigms"))
    parser.add_argument("--summarize", type=Path, default=None, help="print the markdown table of a results.jsonl")
    parser.add_argument("--tailor", type=Path, default=None, help="with --summarize: bench/tailor.py's results.jsonl")
    args = parser.parse_args()
    if args.summarize:
        print(summary_table(args.summarize, args.tailor))
        return
    recipes = arms(args.keep_ramp)
    chosen = args.arms or list(recipes)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(measure, seed, arm, recipes[arm], args.steps, 1, args.out)
                   for seed in args.seeds for arm in chosen]
        for future in as_completed(futures):
            line = future.result()
            line["paradigm"] = recipes[line["arm"]]["paradigm"]
            with log.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
            print(f"{line['seed']:>4} {line['arm']:<18} E {line['E']:+6.1f} F {line['F']:+6.1f} O {line['O']:+6.1f} "
                  f"trainable {line['trainable_params']:>8} step {line['step_seconds']:.3f}s "
                  f"(cpu {line['step_cpu_seconds']:.3f}s)", flush=True)


if __name__ == "__main__":
    main()
