"""FSDP2 on CPU processes: per-rank model state, peak memory and step time at world size 1 and 2, same global batch.

    PYTHONPATH=. python bench/sharding.py [--steps 12] [--global-batch 4] [--out /tmp/sharding]
    PYTHONPATH=. python bench/sharding.py --device cuda [--worlds 1 8]     # GPUs: accelerate shards (bf16)

Each world size is one `torchrun --nproc_per_node N` launch of this file (`--rank-run`): a mid-size random LLaVA
(language 8 x 512, vision 4 x 256, 256 image tokens + 48 text tokens per row) wrapped with LoRA on every modality and the projector trained whole, trained by
MMTuningTrainer with `fsdp: true, fsdp_config: {fsdp_version: 2}` (mmtuning shards it on CPU). Per rank it records
the bytes of its parameter shards, its gradients before each optimizer step (the largest), its AdamW state, its peak RSS, and the mean wall time of
the steps after the first two. The table compares world size 2 with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = {"text_config.hidden_size": 512, "text_config.intermediate_size": 1408, "text_config.num_hidden_layers": 8,
         "text_config.num_attention_heads": 8, "text_config.num_key_value_heads": 8,
         "vision_config.hidden_size": 256, "vision_config.intermediate_size": 704, "vision_config.num_hidden_layers": 4,
         "vision_config.num_attention_heads": 8, "vision_config.image_size": 224, "vision_config.patch_size": 14,
         "image_seq_length": 256}
BLOCK = {"vision": {"layers": {"top": 2}}, "projector": {"selective": "full"}, "language": {}, "r": 16}


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def rank_run(out: Path, steps: int, global_batch: int, device: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback, TrainingArguments

    from mmtuning_plugin.integrations.hf import MMTuningTrainer
    from mmtuning_plugin.session import MMTuning
    from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    cuda = device == "cuda"
    torch.manual_seed(0)
    model = tiny_model("llava", dtype=torch.bfloat16 if cuda else torch.float32, **MODEL)
    batch = tiny_batch(model, batch=global_batch, text_len=48)
    session = MMTuning(BLOCK)
    model = session.wrap(model)
    args = TrainingArguments(output_dir=str(out / f"ws{world}"), per_device_train_batch_size=global_batch // world,
                             max_steps=steps, learning_rate=1e-3, logging_steps=steps, save_strategy="no",
                             report_to=[], use_cpu=not cuda, bf16=cuda, disable_tqdm=True,
                             remove_unused_columns=False, seed=0,
                             train_sampling_strategy="sequential", fsdp=True, fsdp_config={"fsdp_version": 2})
    times: list[float] = []
    gradients: list[int] = []

    class Clock(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **k):
            gradients.append(local_bytes(p.grad for p in trainer.model.parameters()))

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, steps * global_batch),
                              data_collator=stack_rows, mmtuning=session, callbacks=[Clock()])
    trainer.train()
    params = list(trainer.model.parameters())
    optimizer_state = [v for state in trainer.optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor)]
    row = {"world_size": world, "rank": dist.get_rank(), "tokens_per_row": int(batch.inputs["input_ids"].shape[1]),
           "image_tokens_per_row": batch.num_image_tokens, "parameter_bytes": local_bytes(params),
           "gradient_bytes": max(gradients), "optimizer_bytes": local_bytes(optimizer_state),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
           "step_seconds": sum(times[2:]) / max(1, len(times[2:])),
           "sharded_parameters": (session.sharding or {}).get("sharded_parameters"), "parameters": len(params),
           "sharded_by": (session.sharding or {}).get("sharded_by")}
    with (out / f"ws{world}-rank{row['rank']}.json").open("w") as handle:
        json.dump(row, handle)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def launch(world: int, out: Path, steps: int, global_batch: int, device: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                               os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone",
               __file__, "--rank-run", "--out", str(out), "--steps", str(steps), "--global-batch", str(global_batch),
               "--device", device]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"ws{world}-rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sharding"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worlds", type=int, nargs=2, default=[1, 2], help="the two world sizes to compare")
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rank_run:
        rank_run(args.out, args.steps, args.global_batch, args.device)
        return
    small, large = args.worlds
    results = {world: launch(world, args.out, args.steps, args.global_batch, args.device) for world in (small, large)}
    first = results[small][0]
    print(f"global batch {args.global_batch}, {first['tokens_per_row']} tokens per row "
          f"({first['image_tokens_per_row']} image tokens), {args.steps} steps")
    print(f"| per rank | world size {small} | world size {large} (rank 0 / last rank) | ratio {large} : {small} (rank 0) |")
    print("|---|---|---|---|")
    keys = ["parameter_bytes", "gradient_bytes", "optimizer_bytes", "peak_rss_bytes", "step_seconds"]
    for key in keys + (["peak_gpu_bytes"] if args.device == "cuda" else []):
        unit, scale = ("s", 1) if key == "step_seconds" else ("MiB", 2 ** 20)
        one, many = results[small][0][key] / scale, [results[large][0][key] / scale, results[large][-1][key] / scale]
        ratio = f"{many[0] / one:.2f}x" if one else "-"
        print(f"| {key} | {one:.3f} {unit} | {many[0]:.3f} / {many[1]:.3f} {unit} | {ratio} |")
    last = results[large][0]
    print(f"sharded by {last['sharded_by']} at world size {large}: {last['sharded_parameters']} of {last['parameters']} "
          f"parameters")


if __name__ == "__main__":
    main()
