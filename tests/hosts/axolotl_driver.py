"""Runs inside the Axolotl venv (Python 3.12, axolotl 0.21.0), started by tests/hosts/test_axolotl.py.

    python axolotl_driver.py setup DIR TYPE...                # DIR/TYPE tiny checkpoints, DIR/data.jsonl, DIR/keep.jsonl
    python axolotl_driver.py recipes OUT.json TYPE=RECIPE.yml... # Axolotl's own config loading, no weights
    python axolotl_driver.py train-without-plugins CFG.yml    # `axolotl train` with no plugin discovered
    python axolotl_driver.py compare-merge BASE ADAPTER MERGED OUT.json  # merged dir vs PEFT's merge_and_unload

Each command prints or writes JSON; nothing here fakes Axolotl, transformers or PEFT.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

QUESTIONS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]


@contextlib.contextmanager
def fixed_scratch(path: Path):
    """An empty folder at `path`, removed afterwards."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def png_base64(colour: str, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rgb = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}[colour]
    noise = np.random.default_rng(seed).integers(0, 40, (40, 40, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_data(path: str, rows: int = 8) -> None:
    with open(path, "w") as out:
        for i in range(rows):
            colour, shape = QUESTIONS[i % len(QUESTIONS)]
            messages = [
                {"role": "user", "content": [{"type": "image", "base64": png_base64(colour, i)},
                                             {"type": "text", "text": "what shape is in the image ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"a {colour} {shape} ."}]},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def write_keep_data(root: Path) -> None:
    """keep.jsonl for `keep.data`: two unlabelled user turns in Axolotl's own multimodal row format, one image
    inline as base64 and one as a `path` beside the file."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 30, dtype="uint8")).save(root / "keep1.png")
    images = [{"type": "image", "base64": png_base64("red", 100)}, {"type": "image", "path": "keep1.png"}]
    rows = [{"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what colour is the image ?"}]}]}
            for image in images]
    (root / "keep.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def validate_recipes(out: str, recipes: list[str]) -> None:
    """Each YAML through axolotl.cli.config.load_cfg; a hub base_model is swapped for the model type's default
    config written to a temporary directory (no weights, no hub), so the plan is built on the meta device."""
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    from mmtuning_plugin.loading import _default_config  # what `mmtune inspect-targets TYPE` builds

    results = {}
    for item in recipes:
        model_type, recipe = item.split("=", 1)
        raw = yaml.safe_load(Path(recipe).read_text())
        # A fixed folder name in the run's own directory: Axolotl treats any base_model path containing "mpt"
        # as an MPT model, which random temp names ("/tmp/tmpt...") sometimes do.
        with fixed_scratch(Path.cwd() / f"recipe-{model_type}") as tmp:
            if not Path(str(raw.get("base_model"))).is_dir():  # a hub id: its default config, written locally
                _default_config(model_type).save_pretrained(tmp)
                raw["base_model"] = tmp
                raw.pop("base_model_config", None)
            raw["output_dir"] = str(Path(tmp) / "out")
            try:
                cfg = load_cfg(DictDefault(raw))
            except Exception as error:  # the test asserts on the message users would see
                results[recipe] = {"error": f"{type(error).__name__}: {error}"}
                continue
            results[recipe] = {
                "model_type": model_type,
                "adapter": cfg.adapter,
                "load_in_4bit": bool(cfg.load_in_4bit),
                "lora_r": cfg.lora_r,
                "lora_alpha": cfg.lora_alpha,
                "lora_target_modules": list(cfg.lora_target_modules or []),
                "lora_target_parameters": list(cfg.lora_target_parameters or []),
                "lora_rank_pattern": dict(cfg.lora_rank_pattern or {}),
                "lora_alpha_pattern": dict(cfg.lora_alpha_pattern or {}),
                "lora_target_linear": cfg.lora_target_linear,
                "lora_kernels": [cfg.get(k) for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")],
                "mmtuning": cfg.mmtuning,
            }
    Path(out).write_text(json.dumps(results, indent=1))


def train_without_plugins(config: str) -> None:
    """Axolotl exactly as if no plugin were installed: its entry-point list emptied before the CLI starts."""
    import axolotl.integrations.base as base
    from importlib.metadata import entry_points

    base._plugin_entry_points = ()
    base._plugin_entry_points_source = entry_points
    from axolotl.cli.main import main

    sys.argv = ["axolotl", "train", config, "--launcher", "python"]
    main()


def compare_merge(base: str, adapter: str, merged: str, out: str) -> None:
    """Per LoRA-adapted weight: does `merged` (a merged model directory) equal PEFT's merge_and_unload of
    BASE + ADAPTER, and does it differ from BASE? Written per modality to OUT.json."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    def weights(model) -> dict:
        return {name: p.detach().float() for name, p in model.state_dict().items()}

    base_weights = weights(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32))
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), adapter)
    adapted = {name.removeprefix("base_model.model.").replace(".base_layer", "")
               for name, _ in peft.named_parameters() if ".base_layer.weight" in name}
    expected = weights(peft.merge_and_unload())
    got = weights(AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32))
    result: dict = {}
    for name in sorted(adapted):
        kind = ("projector" if "multi_modal_projector" in name else
                "vision" if "vision_tower" in name else "language")
        row = result.setdefault(kind, {"weights": 0, "equal_to_peft": 0, "changed_from_base": 0, "missing": []})
        row["weights"] += 1
        if name not in got:
            row["missing"].append(name)
            continue
        row["equal_to_peft"] += int(torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4))
        row["changed_from_base"] += int(not torch.equal(got[name], base_weights[name]))
    Path(out).write_text(json.dumps(result, indent=1))


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "setup":
        from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

        import importlib.util

        import axolotl.integrations.base as base

        root, *model_types = args
        facts = {"torchvision": importlib.util.find_spec("torchvision") is not None,
                 "entry_points": hasattr(base, "get_builtin_plugins"), "models": [],
                 "axolotl": __import__("importlib.metadata").metadata.version("axolotl")}
        for model_type in model_types:
            if model_type.startswith("qwen") and not facts["torchvision"]:
                continue  # Qwen2-VL's processor needs torchvision (absent from the Axolotl 0.19 fallback venv)
            save_tiny_checkpoint(model_type, Path(root) / model_type)
            facts["models"].append(model_type)
        write_data(str(Path(root) / "data.jsonl"))
        write_keep_data(Path(root))
        (Path(root) / "setup.json").write_text(json.dumps(facts))
    elif command == "recipes":
        validate_recipes(args[0], args[1:])
    elif command == "train-without-plugins":
        train_without_plugins(args[0])
    elif command == "compare-merge":
        compare_merge(*args)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
