"""One rank of the 2-process QLoRA check (launched by tests/test_quant_dist.py through torchrun, gloo backend).

Each rank loads the same tiny model in 4-bit under `all-4bit`, puts LoRA on vision and projector layers,
wraps it in DistributedDataParallel and trains a few steps on different data. Gradients are averaged, so
the adapters must stay identical across ranks while moving away from their initial values.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from ranks import leave_together
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from mmtuning_plugin.loading import load_model_config
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import tiny_batch


def main(model_dir: str, out_dir: str, steps: int = 3) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    session = MMTuning({"quant": "all-4bit", "vision": {"layers": {"top": 2}}, "language": False})
    kwargs = session.bnb_config_kwargs(load_model_config(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**kwargs),
                                                        dtype=torch.bfloat16)
    session.prepare_kbit_training(model)
    torch.manual_seed(0)  # identical adapter init on every rank (DDP also broadcasts rank 0's)
    model = session.wrap(model)
    report = session.verify_quantized(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
    batch = tiny_batch(model.get_base_model(), batch=1).inputs
    generator = torch.Generator().manual_seed(100 + rank)
    batch["pixel_values"] = batch["pixel_values"] + torch.randn(batch["pixel_values"].shape, generator=generator)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ddp.train()
    for _ in range(steps):
        optimizer.zero_grad()
        ddp(**batch).loss.backward()
        optimizer.step()
    final = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(final) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, final)
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "adapters": len(names),
        "vision_adapters": sum("visual.blocks" in n for n in names),
        "projector_adapters": sum("visual.merger" in n for n in names),
        "max_diff_across_ranks": max(float((g - final).abs().max()) for g in gathered),
        "moved": float((final - initial).abs().max()),
        "initial_checksum": float(initial.double().abs().sum()),
        "vision_4bit": len(report["vision"]["4bit"]),
        "projector_4bit": len(report["projector"]["4bit"]),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_together()
