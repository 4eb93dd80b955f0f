"""Pre-train the demo's tiny LLaVA on the synthetic "general" set (colour and shape questions).

    python -m mmtuning_plugin.demo.pretrain            # rewrites mmtuning_plugin/demo/assets/tiny-llava-shapes
    python -m mmtuning_plugin.demo.pretrain --out DIR  # anywhere else

Deterministic on CPU (fixed seeds, one thread, deterministic algorithms): re-running it reproduces the
shipped checkpoint's accuracy, which `pretrain.json` records together with a trace of accuracy at fixed
steps, so a test can re-run the first steps and compare.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .data import make_set
from .model import MODEL_DIR, accuracy, build_processor, build_random_model, encode, predict, training_batch

# The recipe of the shipped checkpoint: facts in one table, read by the script and the test.
PRETRAIN: dict[str, Any] = {
    "seed": 0,
    "steps": 300,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_fraction": 0.1,
    "eval_items": 256,
    "trace_every": 100,
}
METADATA = "pretrain.json"


@contextmanager
def deterministic(threads: int = 1):
    """Same bits on every run: fixed thread count (CPU reductions depend on it) and deterministic kernels."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def pretrain(stop_after: int | None = None, recipe: dict[str, Any] | None = None, log=print):
    """Train from random weights; returns (model, processor, metadata). `stop_after` ends early on the same
    schedule (the reproduction test uses it), so the trace up to that step is identical to a full run's."""
    recipe = {**PRETRAIN, **(recipe or {})}
    steps, batch = recipe["steps"], recipe["batch_size"]
    run_steps = min(steps, stop_after or steps)
    with deterministic():
        model = build_random_model(recipe["seed"])
        processor = build_processor(model.config)
        pad = processor.tokenizer.pad_token_id
        train = encode(processor, make_set("general", "train", run_steps * batch, seed=recipe["seed"]))
        held_out = encode(processor, make_set("general", "eval", recipe["eval_items"], seed=recipe["seed"]))
        torch.manual_seed(recipe["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=steps,
                                                       pct_start=recipe["warmup_fraction"])
        trace: dict[int, float] = {}
        model.train()
        start = time.time()
        for step in range(run_steps):
            loss = model(**training_batch(train[step * batch:(step + 1) * batch], pad)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % recipe["trace_every"] == 0 or step + 1 == run_steps:
                trace[step + 1] = accuracy(predict(model, processor.tokenizer, held_out), held_out)
                log(f"step {step + 1}/{steps}  loss {loss.item():.4f}  general accuracy {trace[step + 1]:.3f}  "
                    f"({time.time() - start:.0f}s)")
        model.eval()
    metadata = {"recipe": recipe, "steps_run": run_steps, "general_accuracy": trace[run_steps],
                "trace": {str(k): v for k, v in trace.items()}, "torch": torch.__version__}
    return model, processor, metadata


def save(model, processor, metadata: dict[str, Any], out: Path) -> Path:
    tokenizer = processor.tokenizer
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help=f"output directory (default {MODEL_DIR})")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps of the same schedule")
    args = parser.parse_args(argv)
    model, processor, metadata = pretrain(stop_after=args.steps)
    save(model, processor, metadata, args.out)
    print(f"saved to {args.out}: general accuracy {metadata['general_accuracy']:.3f}")


if __name__ == "__main__":
    main()
