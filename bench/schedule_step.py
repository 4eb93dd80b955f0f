"""Step time and memory of a `top_down` schedule vs. static LoRA on the same random model, side by side.

Three runs of one model (same seed, same batch), timed in interleaved rounds so machine noise hits all
of them alike (vision encoder frozen in all three):
  static       LoRA on every language layer and the projector, all training (the baseline)
  top_down@0   the first stage of a top_down schedule: top 3 of 12 language layers; projector from 30% on
  top_down@end the same schedule after its last stage (all layers on): should cost what static costs

Memory early in training: bytes of gradients after backward, bytes of tensors autograd saved for backward
(measured with saved_tensors_hooks, exact on any device) and, with --device cuda, the peak allocated memory
of one step (torch.cuda.max_memory_allocated).

    PYTHONPATH=. python bench/schedule_step.py                 # CPU
    PYTHONPATH=. python bench/schedule_step.py --device cuda   # GPU path (bf16 on cuda)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mmtuning_plugin.schedules import LayerScheduler
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model

# A mid-size llava: 12 language layers (hidden 512), 8 vision layers (hidden 256). Random weights.
MODEL_OVERRIDES = {
    "text_config.hidden_size": 512, "text_config.intermediate_size": 1536, "text_config.num_hidden_layers": 12,
    "text_config.num_attention_heads": 8, "text_config.num_key_value_heads": 4, "text_config.head_dim": 64,
    "vision_config.hidden_size": 256, "vision_config.intermediate_size": 1024, "vision_config.num_hidden_layers": 8,
    "vision_config.num_attention_heads": 4, "vision_config.head_dim": 64,
}
TOTAL_STEPS = 100
# Language adapters only (vision off), the projector joining at 30%: anything trained *below* the language
# model (vision adapters, the projector) sends its gradient back through every language layer, so a frozen
# lower language stack only skips its backward when nothing under it trains (docs/schedules.md).
SCHEDULE = {"vision": False, "projector": {"schedule": {"from": 0.3}},
            "language": {"schedule": {"type": "top_down", "start": 3, "step_layers": 3, "every": 0.1}}}
RUNS = {  # name -> (mmtuning config, step at which the schedule is applied)
    "static": ({"vision": False}, 0),
    "top_down@0": (SCHEDULE, 0),
    "top_down@end": (SCHEDULE, TOTAL_STEPS - 1),
}


class Run:
    def __init__(self, name: str, config: dict, step: int, device: str, dtype: torch.dtype, batch: int, text_len: int):
        self.name = name
        session = MMTuning(config)
        model = tiny_model("llava", dtype=dtype, **MODEL_OVERRIDES)
        self.inputs = {k: v.to(device) for k, v in tiny_batch(model, batch=batch, text_len=text_len).inputs.items()}
        if dtype != torch.float32:
            self.inputs["pixel_values"] = self.inputs["pixel_values"].to(dtype)
        self.model = session.wrap(model).to(device).train()
        self.scheduler = LayerScheduler(self.model, session.plan, session.schedule(), TOTAL_STEPS)
        self.active = self.scheduler.apply(step)
        self.optimizer = torch.optim.AdamW(session.optimizer_groups(self.model, 1e-4, 0.01))
        self.device = device

    def step(self) -> None:
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.scheduler.drop_inactive_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start

    def memory(self) -> dict[str, int]:
        """Saved-for-backward bytes and gradient bytes of one step (and CUDA peak when on a GPU)."""
        saved = 0

        def pack(tensor):
            nonlocal saved
            saved += tensor.numel() * tensor.element_size()
            return tensor

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(**self.inputs).loss
        loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        self.optimizer.zero_grad(set_to_none=True)
        out = {"saved_for_backward_bytes": saved, "grad_bytes": grads}
        if self.device == "cuda":
            out["cuda_peak_step_bytes"] = torch.cuda.max_memory_allocated() - base
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each times --steps steps per run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    runs = [Run(name, config, step, args.device, dtype, args.batch, args.text_len) for name, (config, step) in RUNS.items()]
    memory = {run.name: run.memory() for run in runs}
    for run in runs:  # warm-up
        run.step()
    times: dict[str, list[float]] = {run.name: [] for run in runs}
    for _ in range(args.rounds):
        for run in runs:
            times[run.name].extend(run.timed_step() for _ in range(args.steps))
    base = statistics.median(times["static"])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": str(dtype), "batch": args.batch, "text_len": args.text_len,
        "runs": {
            run.name: {
                "active": {m: a.describe() for m, a in run.active.items()},
                "median_step_ms": round(statistics.median(times[run.name]) * 1000, 1),
                "step_time_vs_static": round(statistics.median(times[run.name]) / base, 3),
                **memory[run.name],
                "saved_for_backward_vs_static": round(memory[run.name]["saved_for_backward_bytes"]
                                                      / memory["static"]["saved_for_backward_bytes"], 3),
                "grad_bytes_vs_static": round(memory[run.name]["grad_bytes"] / memory["static"]["grad_bytes"], 3),
            }
            for run in runs
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"device {result['device']}, {result['dtype']}, batch {args.batch} x {args.text_len} tokens, "
          f"{args.rounds}x{args.steps} timed steps per run (interleaved)")
    header = f"{'run':<14}{'active layers':<40}{'step ms':>9}{'x static':>10}{'saved MiB':>11}{'grad MiB':>10}"
    if args.device == "cuda":
        header += f"{'peak MiB':>10}"
    print(header)
    for name, row in result["runs"].items():
        active = ", ".join(f"{m} {a}" for m, a in row["active"].items())
        line = (f"{name:<14}{active:<40}{row['median_step_ms']:>9}{row['step_time_vs_static']:>10}"
                f"{row['saved_for_backward_bytes'] / 2**20:>11.1f}{row['grad_bytes'] / 2**20:>10.2f}")
        if args.device == "cuda":
            line += f"{row['cuda_peak_step_bytes'] / 2**20:>10.1f}"
        print(line)


if __name__ == "__main__":
    main()
