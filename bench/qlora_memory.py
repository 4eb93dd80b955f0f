"""Peak memory and step time of one QLoRA training step under each quantization preset, side by side.

For one architecture (Qwen2.5-VL), one random-weight checkpoint is written once, then every variant runs in
its own fresh process (so peaks do not leak into each other), in one invocation:
`all-4bit`, `balanced`, `language-4bit` (all through mmtuning's policy, k-bit prep without upcast) and plain
bf16 LoRA (no quantization). Every variant trains the same LoRA targets (vision, projector, language, r=16).

CPU (mid-size random model):  python bench/qlora_memory.py --device cpu
GPU (full-size random-weight Qwen2.5-VL-7B, batch 1, one 448x448 image, 512 text tokens):
                               python bench/qlora_memory.py --device cuda --size 7b

Peak memory: on CPU the peak RSS of the training steps (VmHWM reset after loading, shown above the RSS of the
bare interpreter with torch imported; the whole-process peak incl. loading is in --json as load_peak_rss); on
GPU torch.cuda.max_memory_allocated over the training steps (weights included). Weights:
bytes really allocated by the loaded model (4-bit data + quantization constants + 16-bit weights) next to
mmtuning's estimate for it. Step time: median of the timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("all-4bit", "balanced", "language-4bit", "bf16-lora")
ROOT = Path(__file__).resolve().parents[1]

# Sizes: "mid" is a ~70M-parameter random model a CPU can step through; "7b" is Qwen2.5-VL-7B-Instruct's layout.
SIZES = {
    "mid": {
        "vision_config.depth": 8, "vision_config.hidden_size": 384, "vision_config.intermediate_size": 1024,
        "vision_config.num_heads": 6, "vision_config.out_hidden_size": 768,
        "vision_config.fullatt_block_indexes": [3, 7],
        "text_config.hidden_size": 768, "text_config.intermediate_size": 2048, "text_config.num_hidden_layers": 6,
        "text_config.num_attention_heads": 12, "text_config.num_key_value_heads": 4, "text_config.vocab_size": 8192,
        "text_config.max_position_embeddings": 4096, "text_config.layer_types": ["full_attention"] * 6,
        "text_config.rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
        "image_token_id": 8000, "video_token_id": 8001, "vision_start_token_id": 8002, "vision_end_token_id": 8003,
        "tie_word_embeddings": False,
    },
    "7b": {
        "vision_config.depth": 32, "vision_config.hidden_size": 1280, "vision_config.intermediate_size": 3420,
        "vision_config.num_heads": 16, "vision_config.out_hidden_size": 3584,
        "vision_config.fullatt_block_indexes": [7, 15, 23, 31], "vision_config.window_size": 112,
        "text_config.hidden_size": 3584, "text_config.intermediate_size": 18944, "text_config.num_hidden_layers": 28,
        "text_config.num_attention_heads": 28, "text_config.num_key_value_heads": 4, "text_config.vocab_size": 152064,
        "text_config.max_position_embeddings": 128000, "text_config.layer_types": ["full_attention"] * 28,
        "text_config.rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
    },
}
ADAPTERS = {"vision": True, "projector": True, "language": True, "r": 16, "alpha": 32}


def build_config(size: str):
    from transformers import AutoConfig

    from mmtuning_plugin.model_config import set_dotted

    config = AutoConfig.for_model("qwen2_5_vl")
    for dotted, value in SIZES[size].items():
        set_dotted(config, dotted, value)
    return config


def write_checkpoint(size: str, directory: Path) -> None:
    """Random bf16 weights saved once; every variant loads (and quantizes) the same checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config(size), dtype=torch.bfloat16)
    model.save_pretrained(directory)


def make_batch(config, image: int, text_tokens: int, device: str):
    """Qwen2.5-VL inputs: one image of image x image pixels as flattened patches, plus text tokens."""
    import torch

    vision = config.vision_config
    grid_h = grid_w = image // vision.patch_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(grid_h * grid_w, patch_dim, generator=generator)
    image_tokens = grid_h * grid_w // vision.spatial_merge_size**2
    text = torch.randint(10, 1000, (text_tokens,), generator=generator)
    ids = torch.cat([text[:4], torch.tensor([config.vision_start_token_id]),
                     torch.full((image_tokens,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     text[4:]]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : 4 + image_tokens + 2] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(torch.bfloat16),
              "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]), "labels": labels,
              "mm_token_type_ids": (ids == config.image_token_id).long()}
    return {k: v.to(device) for k, v in inputs.items()}


def run_variant(args) -> dict:
    """One variant in this (fresh) process: load, prepare, wrap, time `steps` training steps."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from mmtuning_plugin.loading import load_model_config
    from mmtuning_plugin.quant import allocated_weight_bytes, memory_estimate
    from mmtuning_plugin.session import MMTuning

    torch.set_num_threads(args.threads)
    baseline_rss = _rss_bytes()  # python + torch + transformers, before any weight exists
    quantized = args.variant != "bf16-lora"
    session = MMTuning({**ADAPTERS, **({"quant": args.variant} if quantized else {})})
    model_config = load_model_config(args.model_dir)
    kwargs = session.bnb_config_kwargs(model_config) if quantized else None
    device_map = {"": 0} if args.device == "cuda" else None
    model = AutoModelForImageTextToText.from_pretrained(
        args.model_dir, dtype=torch.bfloat16, device_map=device_map,
        quantization_config=BitsAndBytesConfig(**kwargs) if kwargs else None)
    if quantized:
        session.verify_quantized(model)
        session.prepare_kbit_training(model)
    weights = allocated_weight_bytes(model)
    model = session.wrap(model)
    from mmtuning_plugin.loading import build_skeleton

    estimate = memory_estimate(build_skeleton(model_config), session.config.quant, session.plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(model_config, args.image, args.text_tokens, args.device)
    model.train()
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 is warm-up
            times.append(time.perf_counter() - start)
    result = {"variant": args.variant, "weight_bytes": weights, "baseline_rss": baseline_rss,
              "estimated_weight_bytes": estimate["total"]["weight_bytes"], "trainable_params": trainable,
              "step_s": statistics.median(times), "loss": float(loss.detach())}
    if args.device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["train_peak_rss"] = _status_bytes("VmHWM")  # since _reset_peak_rss: the training steps
    return result


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _reset_peak_rss() -> None:
    """Drop loading transients from the CPU peak: give freed heap back to the OS, then reset VmHWM (Linux)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def run_child(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--model-dir", args.model_dir, "--device", args.device,
               "--image", str(args.image), "--text-tokens", str(args.text_tokens), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"variant {variant} failed (status {status}); rerun it alone: {' '.join(command)}")
    result = json.loads(output.strip().splitlines()[-1])
    if args.device == "cpu":
        result["load_peak_rss"] = usage.ru_maxrss * 1024  # whole process, loading included
        result["peak_bytes"] = result["train_peak_rss"]
        result["peak_above_baseline"] = result["train_peak_rss"] - result["baseline_rss"]
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["variant"] == "bf16-lora"), results[-1])
    peak = "peak_above_baseline" if "peak_above_baseline" in base else "peak_bytes"
    label = "training peak RSS above baseline" if peak == "peak_above_baseline" else "peak allocated"
    lines = [f"| variant | weights (allocated) | weights (estimate) | weights vs bf16 LoRA | trainable | {label} "
             f"| peak vs bf16 LoRA | step time | step vs bf16 LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['weight_bytes'] / 2**20:.1f} MiB | {r['estimated_weight_bytes'] / 2**20:.1f} MiB "
                     f"| {r['weight_bytes'] / base['weight_bytes']:.2f} | {r['trainable_params'] / 1e6:.2f}M "
                     f"| {r[peak] / 2**20:.0f} MiB | {r[peak] / base[peak]:.2f} | {r['step_s']:.2f} s "
                     f"| {r['step_s'] / base['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="mid (CPU default) or 7b (GPU default)")
    parser.add_argument("--image", type=int, default=None, help="image side in pixels (CPU 112, GPU 448)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (CPU 64, GPU 512)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model-dir", default=None, help="reuse a checkpoint written by an earlier run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.size = args.size or ("7b" if gpu else "mid")
    args.image = args.image or (448 if gpu else 112)
    args.text_tokens = args.text_tokens or (512 if gpu else 64)
    if args.child:
        args.variant = args.child
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as scratch:
        if args.model_dir is None:
            args.model_dir = str(Path(scratch) / "model")
            write_checkpoint(args.size, Path(args.model_dir))
        results = [run_child(args, variant) for variant in args.variants.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"qwen2_5_vl size={args.size} device={args.device} image={args.image}px text={args.text_tokens} "
          f"batch=1 steps={args.steps}")
    print(table(results))


if __name__ == "__main__":
    main()
