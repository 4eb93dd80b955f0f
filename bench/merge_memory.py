"""Peak memory and time of `mmtune convert merge` (shard streaming) vs PEFT's merge_and_unload + save_pretrained.

Builds a mid-size random LLaVA (a few hundred MB in bf16, saved in 100 MB shards) and a LoRA adapter on every
language-model Linear, then runs each method in its own subprocess (so peak RSS is per method) side by side,
plus an `idle` worker that only imports the same libraries (the floor both pay). Outputs are compared.

    PYTHONPATH=$PWD python bench/merge_memory.py                 # CPU
    PYTHONPATH=$PWD python bench/merge_memory.py --device cuda   # GPU path (additions/PEFT model on cuda)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"text_config.hidden_size": 1024, "text_config.intermediate_size": 2816, "text_config.num_hidden_layers": 12,
         "text_config.num_attention_heads": 16, "text_config.num_key_value_heads": 16, "text_config.head_dim": 64,
         "text_config.vocab_size": 32000}


def build(root: Path, rank: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from mmtuning_plugin.testing.tiny import tiny_model

    model = tiny_model("llava", dtype=torch.bfloat16, **SIZES)
    base_dir, adapter_dir = root / "base", root / "adapter"
    model.save_pretrained(base_dir, max_shard_size="100MB")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=r".*language_model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    get_peft_model(model, config).save_pretrained(adapter_dir)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    return base_dir, adapter_dir, params, size


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM is per address space; ru_maxrss survives fork+exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, base: str, adapter: str, out: str, device: str) -> None:
    import torch  # noqa: F401  (the floor: both methods import torch, transformers, peft)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    start = time.perf_counter()
    if method == "mmtune":
        from mmtuning_plugin.cli import app
        try:
            app(["convert", "merge", adapter, "--base", base, "--out", out, "--device", device, "--json"],
                standalone_mode=False)
        except SystemExit as error:
            if error.code:
                raise
    elif method == "peft":
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size="100MB")
    seconds = time.perf_counter() - start
    report = {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(report), flush=True)


def run_worker(method: str, base: Path, adapter: Path, out: Path, device: str) -> dict:
    command = [sys.executable, __file__, "--worker", method, str(base), str(adapter), str(out), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not line:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    other = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    handles = {}
    for key, shard in index.items():
        if key not in other:
            continue
        for path in (a / shard, b / other[key]):
            handles.setdefault(path, safe_open(str(path), "pt"))
        x, y = handles[a / shard].get_tensor(key).float(), handles[b / other[key]].get_tensor(key).float()
        worst = max(worst, float((x - y).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "BASE", "ADAPTER", "OUT"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, device=args.device)
        return
    with tempfile.TemporaryDirectory(prefix="mmtune-merge-bench-") as tmp:
        root = Path(tmp)
        base, adapter, params, size = build(root, args.rank)
        rows = [run_worker(m, base, adapter, root / m, args.device) for m in ("idle", "mmtune", "peft")]
        difference = max_difference(root / "mmtune", root / "peft")
    by = {r["method"]: r for r in rows}
    print(f"model: llava, {params / 1e6:.0f}M params, {size / 1e6:.0f} MB bf16 checkpoint in 100 MB shards; "
          f"LoRA r={args.rank} on every language-model Linear; device {args.device}")
    print(f"{'method':<44}{'time s':>8}{'peak RSS MB':>13}{'above idle MB':>15}")
    labels = {"idle": "imports only (floor)", "mmtune": "mmtune convert merge (streaming shards)",
              "peft": "PeftModel.merge_and_unload + save_pretrained"}
    for method in ("idle", "mmtune", "peft"):
        r = by[method]
        print(f"{labels[method]:<44}{r['seconds']:>8.1f}{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] - by['idle']['peak_rss_mb']:>15.0f}")
    above = lambda m: by[m]["peak_rss_mb"] - by["idle"]["peak_rss_mb"]  # noqa: E731
    print(f"ratios mmtune/peft: time {by['mmtune']['seconds'] / by['peft']['seconds']:.2f}x, peak RSS "
          f"{by['mmtune']['peak_rss_mb'] / by['peft']['peak_rss_mb']:.2f}x, above-floor "
          f"{above('mmtune') / above('peft'):.2f}x; max |weight difference| between outputs {difference:.2e}")


if __name__ == "__main__":
    main()
