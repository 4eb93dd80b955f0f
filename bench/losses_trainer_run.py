"""A real MMTuningTrainer run with the alignment losses on, printing what the Trainer logs.

    python bench/losses_trainer_run.py [--steps 30] [--model-type llava]

Trains the same tiny model twice from the same seed, task loss alone and task loss + losses, then measures
on the training batch how far each run's projector moved from the frozen projector (anchor's 1 - cosine)
and the LoRASculpt conflict norm, with the same loss code used as a probe. docs/losses.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from transformers import TrainingArguments

from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.losses import LossSuite, validate_losses
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

LOSSES = {
    "anchor": {"weight": 0.5, "warmup_steps": 5},
    "contrastive": {"weight": 0.05},
    "sculpt": {"weight": 1e-2, "sparsify_from": 20, "keep": 0.1},
    "multiscale": {"weight": 0.5, "of": "anchor", "layers": [-1, -2]},
}


def train(model_type: str, losses: dict, steps: int, batch, out: str):
    session = MMTuning({"vision": {"layers": {"top": 2}}, "losses": losses})
    model = session.wrap(tiny_model(model_type))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                             logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch, 64), data_collator=stack_rows,
                              mmtuning=session)
    trainer.train()
    session.detach()
    return model, [e for e in trainer.state.log_history if "loss" in e]


def probe(model, batch) -> dict[str, float]:
    """Projector drift and conflict norm of a trained model, measured with the loss code itself."""
    suite = LossSuite(validate_losses({"anchor": {"weight": 1.0}, "sculpt": {"weight": 1.0}}))
    suite.attach(model)
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
        values = {k.split("/")[-1]: float(v) for k, v in suite.compute(batch).items()}
    suite.detach()
    return {"projector_drift": values["anchor"], "conflict_norm": values["sculpt"], "task_loss": float(outputs.loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model-type", default="llava")
    args = parser.parse_args()
    batch = tiny_batch(tiny_model(args.model_type), batch=4).inputs
    with tempfile.TemporaryDirectory() as out:
        plain, plain_log = train(args.model_type, {}, args.steps, batch, out)
        aligned, aligned_log = train(args.model_type, LOSSES, args.steps, batch, out)
    print("losses:", json.dumps(LOSSES))
    print("logged (task + losses run):")
    for entry in aligned_log:
        keys = ["step", "loss"] + sorted(k for k in entry if k.startswith("loss_align/"))
        print("  " + json.dumps({k: round(entry[k], 6) if isinstance(entry[k], float) else entry[k] for k in keys}))
    print("logged (task-only run):")
    for entry in plain_log:
        print("  " + json.dumps({"step": entry["step"], "loss": round(entry["loss"], 6)}))
    print("after training, on the training batch:")
    print("  task only:      " + json.dumps({k: round(v, 6) for k, v in probe(plain, batch).items()}))
    print("  task + losses:  " + json.dumps({k: round(v, 6) for k, v in probe(aligned, batch).items()}))


if __name__ == "__main__":
    main()
