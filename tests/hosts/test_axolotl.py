"""The Axolotl plugin under the real `axolotl train` (Axolotl 0.21.0, Python 3.12, its own venv).

scripts/test builds that venv (scripts/env.sh axolotl_venv) and exports MMTUNING_AXOLOTL_PYTHON; every
Axolotl process runs there as a subprocess (tests/hosts/axolotl_driver.py), while the asserts run here.
All runs start at once (they mostly wait on imports) and are shared by the tests below:

  llava_lora    the host conformance scenario (tests/hosts/conformance.py): LLaVA-style tiny model, 4-bit QLoRA,
                vision + projector + language adapters, `quant: balanced`, a language layer schedule, the anchor
                loss; its report is compared with the transformers Trainer's run of the same block
  qwen_qlora    Qwen2-VL-style tiny model, 4-bit QLoRA (real bitsandbytes on CPU), same three modalities,
                `quant: balanced` and the `anchor` alignment loss
  llava_noblock LLaVA, no `mmtuning:` block, plugin installed (auto-registered by its entry point)
  llava_bare    the same YAML with Axolotl discovering no plugin at all
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conformance import SCENARIO, assert_conforms, check_report, expected_llava_modules, read_report

PYTHON = os.environ.get("MMTUNING_AXOLOTL_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="MMTUNING_AXOLOTL_PYTHON unset: run through scripts/test, "
                                                   "which builds the Axolotl venv")
HERE = Path(__file__).parent
ROOT = HERE.parent.parent
DRIVER = HERE / "axolotl_driver.py"
RECIPES = ROOT / "recipes" / "axolotl"
RECIPE_TYPES = {
    "qwen2_5_vl_7b_qlora.yml": "qwen2_5_vl",
    "qwen2_5_vl_72b_fsdp2_qlora.yml": "qwen2_5_vl",
    "qwen3_vl_8b_qlora.yml": "qwen3_vl",
    "llava_1_5_7b_qlora.yml": "llava",
    "llama_3_2_11b_vision_qlora.yml": "mllama",
    "gemma_3_4b_qlora.yml": "gemma3",
    "smolvlm2_2_2b_qlora.yml": "smolvlm",
}
MMTUNING = {"vision": {"modules": "attention", "layers": {"top": 2}, "r": 4},
            "projector": {"r": 8}, "language": {"modules": "all-linear", "r": 8}, "r": 8, "alpha": 16}
STEPS = 6
# Axolotl 0.19 validates Qwen3-VL configs as MPT ("gradient_checkpointing is not supported for MPT models").
RECIPE_NEEDS_AXOLOTL_021 = {"qwen3_vl_8b_qlora.yml"}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}


def axolotl_cli() -> list[str]:
    return [str(Path(PYTHON).parent / "axolotl"), "train"]


def base_yaml(root: Path, model_type: str, name: str) -> dict:
    return {
        "base_model": str(root / model_type), "processor_type": "AutoProcessor",
        "adapter": "lora", "chat_template": "tokenizer_default",
        "datasets": [{"path": str(root / "data.jsonl"), "type": "chat_template", "ds_type": "json"}],
        "skip_prepare_dataset": True, "remove_unused_columns": False, "sample_packing": False,
        "sequence_len": 128, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": STEPS,
        "num_epochs": 1, "learning_rate": 0.01, "lr_scheduler": "constant", "optimizer": "adamw_torch",
        "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no", "seed": 42, "val_set_size": 0,
        "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False, "dataloader_num_workers": 0,
        # Axolotl auto-enables fused LoRA kernels, which fail on LLaVA ("could not import attention class"); the bare runs need it too.
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False, "lora_embedding_kernel": False,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "output_dir": str(root / f"out_{name}"), "dataset_prepared_path": str(root / f"prepared_{name}"),
    }


def with_mmtuning(config: dict, **extra) -> dict:
    config = copy.deepcopy(config)
    for key in ("lora_r", "lora_alpha", "lora_dropout", *(k for k in config if k.endswith("_kernel"))):
        config.pop(key)
    config["plugins"] = ["mmtuning_plugin.integrations.axolotl.MMTuningPlugin"]
    config["mmtuning"] = {**copy.deepcopy(MMTUNING), **extra}
    return config


def typical_user_yaml(root: Path, name: str, **mmtuning) -> dict:
    """An Axolotl LLaVA LoRA YAML as users write it (rank 32, alpha 16, dropout 0.05, all linear layers, no
    kernel keys) plus the two mmtuning lines: `plugins:` and an `mmtuning:` block."""
    config = {key: value for key, value in base_yaml(root, "llava", name).items() if not key.endswith("_kernel")}
    config.update(lora_r=32, lora_alpha=16, lora_dropout=0.05, lora_target_linear=True)
    config["plugins"] = ["mmtuning_plugin.integrations.axolotl.MMTuningPlugin"]
    config["mmtuning"] = mmtuning or TYPICAL_BLOCK
    return config


TYPICAL_BLOCK = {"vision": {"modules": "attention", "layers": {"top": 2}, "r": 8}}


def launch(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(), cwd=log.parent)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    """Tiny checkpoints, training data and keep data, written by the Axolotl venv; (root, setup facts)."""
    root = tmp_path_factory.mktemp("axolotl")
    subprocess.run([PYTHON, str(DRIVER), "setup", str(root), "llava", "qwen2_vl"], check=True, env=env(),
                   capture_output=True)
    return root, json.loads((root / "setup.json").read_text())


def run_all(root: Path, commands: dict[str, list[str]]) -> None:
    """Start every command at once (they mostly wait on imports); each must exit 0, except `*_refused` runs,
    which must fail."""
    processes = {name: launch(command, root / f"{name}.log") for name, command in commands.items()}
    failed = {name: p.wait(timeout=900) for name, p in processes.items()}
    for name, code in failed.items():
        if name.endswith("_refused"):
            assert code != 0, f"{name} was not refused:\n" + (root / f"{name}.log").read_text()[-4000:]
            continue
        assert code == 0, f"{name} failed:\n" + (root / f"{name}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, Path]:
    """Every `axolotl train` run and the config checks, in parallel."""
    root, facts = tiny
    configs = {
        "llava_lora": with_mmtuning({**base_yaml(root, "llava", "llava_lora"), "adapter": "qlora", "load_in_4bit": True},
                                    **SCENARIO),
        "qwen_qlora": with_mmtuning({**base_yaml(root, "qwen2_vl", "qwen_qlora"), "adapter": "qlora",
                                     "load_in_4bit": True}, quant="balanced", losses={"anchor": {"weight": 0.1}}),
        "llava_noblock": {**base_yaml(root, "llava", "llava_noblock"), "lora_target_linear": True},
        "llava_bare": {**base_yaml(root, "llava", "llava_bare"), "lora_target_linear": True},
        "llava_typical": typical_user_yaml(root, "llava_typical"),
        "llava_refused": typical_user_yaml(root, "llava_refused", r=8, alpha=64, **TYPICAL_BLOCK),
        "llava_auto": {**with_mmtuning(base_yaml(root, "llava", "llava_auto"), language=AUTO_LANGUAGE), "max_steps": 2},
    }
    if "qwen2_vl" not in facts["models"]:
        configs.pop("qwen_qlora")
    commands = {}
    for name, config in configs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(config))
        if name == "llava_bare":
            commands[name] = [PYTHON, str(DRIVER), "train-without-plugins", str(path)]
        else:
            commands[name] = [*axolotl_cli(), str(path), "--launcher", "python"]
    commands["configs"] = [PYTHON, str(DRIVER), "recipes", str(root / "configs.json"),
                           *config_checks(root, configs["llava_lora"])]
    run_all(root, commands)
    return {"root": root, "facts": facts, **{name: root for name in commands}}


AUTO_LANGUAGE = {"modules": "attention", "r": 8, "layers": {"auto": {"top_k": 2, "batches": 1}}}


def test_layers_auto_probes_the_runs_first_batch_before_axolotl_wraps(runs):
    """The probe ran on the first micro-batch of Axolotl's own dataset and collator; the report holds its
    scores and only the chosen language layers got adapters."""
    root = runs["root"]
    plan = json.loads((root / "out_llava_auto" / "mmtuning_report.json").read_text())["peft"]  # plan.summary()
    probe = plan["probe"]
    assert probe["batches"] == 1 and probe["answer_tokens"] > 0, probe
    language = probe["modalities"]["language"]
    best = sorted(language["layers"], key=lambda s: (-s["score"], -s["layer"]))[:2]
    assert language["chosen"] == sorted(s["layer"] for s in best) == plan["layers"]["language"]
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name in adapter_modules(root / "out_llava_auto")
               if "language_model" in name}
    assert adapted == set(language["chosen"])
    assert "layers chosen by the probe on 1 batch(es): language layers" in (root / "llava_auto.log").read_text()


def config_checks(root: Path, good: dict) -> list[str]:
    """`TYPE=YAML` arguments: the six recipes plus YAMLs that must be refused with a pointed message."""
    items = [f"{model_type}={RECIPES / name}" for name, model_type in RECIPE_TYPES.items()]
    bad = {
        "bad_contradictions": {"lora_r": 32, "lora_alpha": 8},
        "bad_pattern": {"lora_rank_pattern": {"q_proj": 4}},
        "bad_layers": {"mmtuning": {**MMTUNING, "vision": {"layers": {"top": 99}}}},
        "bad_key": {"mmtuning": {**MMTUNING, "visoin": {"r": 4}}},
        "bad_freeze": {"freeze_mm_modules": True},
        "bad_method": {"mmtuning": {**MMTUNING, "method": {"name": "moe-lora", "experts": 2}}},
        "bad_init": {"mmtuning": {**MMTUNING, "init": "pissa"}},
        "bad_fsdp": {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True},
                     "mmtuning": {**MMTUNING, "projector": {"selective": {"method": "spider"}}}},
    }
    for name, change in bad.items():
        config = {**good, **change, "base_model": str(root / "llava")}
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(config))
        items.append(f"llava={path}")
    return items


def losses(log: Path) -> list[float]:
    """Per-step training losses as the Trainer printed them (`{'loss': '5.719', ...}`)."""
    return [float(v) for v in re.findall(r"\{'loss': '?([0-9.eE+-]+|nan|inf)'?,", log.read_text())]


def adapter_modules(out: Path) -> dict[str, int]:
    """Module name -> LoRA rank from the saved adapter_model.safetensors."""
    from safetensors import safe_open

    ranks = {}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_A\.weight", key)
            if match:
                ranks[match.group(1)] = f.get_slice(key).get_shape()[0]
    return ranks


def modality(name: str) -> str:
    if "multi_modal_projector" in name or "merger" in name:
        return "projector"
    return "vision" if ("vision_tower" in name or "visual" in name) else "language"


def test_conformance_scenario_trains_exactly_the_planned_adapters_and_reports_like_the_trainer(runs, trainer_reference):
    """vision + projector + language on 4-bit LLaVA under `quant: balanced`, a language schedule and the anchor loss:
    the saved adapter holds exactly the planned modules and ranks, and mmtuning_report.json (one group per modality,
    every contract phase, the quantization verified) equals the transformers Trainer's wherever the host cannot
    matter."""
    out = runs["root"] / "out_llava_lora"
    assert adapter_modules(out) == expected_llava_modules()
    report = read_report(out)
    check_report(report, "axolotl")
    assert_conforms(report, trainer_reference)
    log = (runs["root"] / "llava_lora.log").read_text()
    assert "loss_align/anchor" in log and "mmtuning: quantized exactly as the `quant:` policy says (balanced)" in log
    values = losses(runs["root"] / "llava_lora.log")
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)


def test_qlora_run_on_qwen2_vl_trains_all_three_modalities_in_4bit(runs):
    if "qwen_qlora" not in runs:
        pytest.skip("this Axolotl venv has no torchvision, which Qwen2-VL's processor needs (the 0.19 fallback)")
    out = runs["root"] / "out_qwen_qlora"
    modules = adapter_modules(out)
    by_modality = {m: {k: r for k, r in modules.items() if modality(k) == m} for m in ("vision", "projector", "language")}
    assert set(by_modality["vision"]) == {f"model.visual.blocks.{i}.attn.{p}" for i in (2, 3) for p in ("qkv", "proj")}
    assert set(by_modality["vision"].values()) == {4}
    assert set(by_modality["projector"]) == {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
    assert len(by_modality["language"]) == 4 * 7 and set(by_modality["language"].values()) == {8}
    quantized = read_report(out)["quantization"]["modalities"]
    assert quantized["language"]["4bit"] >= 4 * 7  # every LM Linear is NF4 under its LoRA
    # quant: balanced keeps the merger and vision blocks 0 and 3 in 16-bit: only blocks 1-2 (4 Linears each) are NF4
    assert quantized["vision"]["4bit"] == 2 * 4
    assert quantized["projector"]["4bit"] == 0
    log = (runs["root"] / "qwen_qlora.log").read_text()
    assert "loss_align/anchor" in log  # the alignment loss reaches Axolotl's trainer and its logs
    values = losses(runs["root"] / "qwen_qlora.log")
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]


def test_without_mmtuning_block_the_plugin_changes_nothing(runs):
    root = runs["root"]
    assert adapter_modules(root / "out_llava_noblock") == adapter_modules(root / "out_llava_bare")
    if runs["facts"]["entry_points"]:
        # Axolotl 0.21 loads the plugin in the no-block run too: same seed, same losses. (0.19 discovers no
        # plugins, so both runs are plain Axolotl there, and its CPU losses vary from run to run.)
        assert losses(root / "llava_noblock.log") == losses(root / "llava_bare.log")
    assert len(losses(root / "llava_noblock.log")) == STEPS
    assert not (root / "out_llava_noblock" / "mmtuning_report.json").exists()
    plugin = "mmtuning_plugin.integrations.axolotl.MMTuningPlugin"
    if runs["facts"]["entry_points"]:  # Axolotl >= 0.21 registers it through its entry point
        assert plugin in (root / "llava_noblock.log").read_text()
    assert plugin not in (root / "llava_bare.log").read_text()


def test_every_recipe_validates_in_axolotl_and_matches_inspect_targets(runs):
    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    results = json.loads((runs["root"] / "configs.json").read_text())
    for name, model_type in RECIPE_TYPES.items():
        if name in RECIPE_NEEDS_AXOLOTL_021 and runs["facts"]["axolotl"].startswith("0.19"):
            continue
        recipe = str(RECIPES / name)
        result = results[recipe]
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert result["adapter"] == "qlora" and result["load_in_4bit"]
        assert not result["lora_target_linear"] and result["lora_kernels"] == [False, False, False]
        shown = CliRunner().invoke(app, ["inspect-targets", model_type, "--spec", recipe, "--json"])
        assert shown.exit_code == 0, shown.output
        report = json.loads(shown.output)
        plan = report["plan"]
        assert result["lora_target_modules"] == plan["target_modules"], name
        assert result["lora_target_parameters"] == plan["target_parameters"], name
        assert result["lora_rank_pattern"] == plan["rank_pattern"], name
        targeted = {m: len(row["targeted"]) for m, row in report["modalities"].items()}
        assert all(targeted[m] > 0 for m in ("vision", "projector", "language")), (name, targeted)
        usable = report["modalities"]["vision"]["usable_layers"]  # LLaVA: its last vision layer feeds nothing
        assert report["modalities"]["vision"]["selected_layers"] == list(range(usable - 8, usable)), name


@pytest.mark.parametrize("name, message", [
    ("bad_contradictions", "these Axolotl settings contradict the `mmtuning:` block: `lora_r: 32` vs `mmtuning.r: 8` "
                           "(keep one); `lora_alpha: 8` vs `mmtuning.alpha: 16` (keep one)."),
    ("bad_pattern", "`lora_rank_pattern: {'q_proj': 4}` (the `mmtuning:` block plans this itself"),
    ("bad_layers", "mmtuning.vision.layers: asks for top 99 layers but there are only 3 (0-2 usable"),
    ("bad_key", "mmtuning.visoin: unknown key"),
    ("bad_freeze", "freeze_mm_modules: true would freeze the vision and projector adapters"),
    ("bad_method", "mmtuning.method: moe-lora (Axolotl builds LoRA adapters only"),
    ("bad_init", "mmtuning.init: pissa (Axolotl builds its LoRA itself"),
    ("bad_fsdp", "mmtuning.projector.selective: spider under fsdp"),
])
def test_conflicting_or_wrong_yaml_is_refused_naming_the_key(runs, name, message):
    results = json.loads((runs["root"] / "configs.json").read_text())
    result = results[str(runs["root"] / f"{name}.yml")]
    assert "error" in result and message in result["error"], result


# --- keep: prompts over the batch's images and a keep-data file, under Axolotl's processor and template ------

KEEP = {"prompts": ["what colour is the image ?"], "images": "train", "data": "keep.jsonl", "target": "answers",
        "weight": 0.5, "ramp": 0, "batch_size": 2, "answer_tokens": 4}


@pytest.fixture(scope="module")
def keep_runs(tiny) -> Path:
    """`axolotl train` with `keep:` (llava_keep), and Axolotl's config loading of that YAML and of a keep YAML
    it cannot honour (keep images without processor_type)."""
    root, _ = tiny
    keep = {**KEEP, "data": str(root / KEEP["data"])}
    good = with_mmtuning(base_yaml(root, "llava", "llava_keep"), keep=keep)
    good.update(micro_batch_size=1, gradient_accumulation_steps=4)  # a single-GPU user's shape: keep rows per step
    (root / "llava_keep.yml").write_text(yaml.safe_dump(good))
    bad = {key: value for key, value in good.items() if key != "processor_type"}
    (root / "bad_keep_processor.yml").write_text(yaml.safe_dump(bad))
    run_all(root, {
        "llava_keep": [*axolotl_cli(), str(root / "llava_keep.yml"), "--launcher", "python"],
        "keep_configs": [PYTHON, str(DRIVER), "recipes", str(root / "keep_configs.json"),
                         f"llava={root / 'llava_keep.yml'}", f"llava={root / 'bad_keep_processor.yml'}"],
    })
    return root


def logged(log: Path, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"'{re.escape(key)}': '?([0-9.eE+-]+|nan|inf)'?", log.read_text())]


def test_keep_run_logs_a_nonzero_keep_term_and_trains_the_adapters(keep_runs):
    log = keep_runs / "llava_keep.log"
    keep = logged(log, "loss_keep")
    assert len(keep) == STEPS and all(math.isfinite(v) and v > 0 for v in keep), keep
    values = losses(log)
    assert len(values) == STEPS and values[-1] < values[0]
    out = keep_runs / "out_llava_keep"
    assert adapter_modules(out) == expected_llava_modules()
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    untrained = [k for k, v in tensors.items() if ".lora_B." in k and not v.abs().sum() > 0]
    assert not untrained, untrained[:5]


def test_keep_report_shows_prompts_axolotls_template_and_base_answers(keep_runs):
    text = (keep_runs / "llava_keep.log").read_text()
    assert "mmtuning keep: 1 prompt(s), 2 conversation(s), images: the training batches' images" in text
    assert "target answers, weight 0.5" in text
    templates = re.findall(r"mmtuning keep template: '(.*)'", text)
    # the tiny checkpoint's own chat template (chat_template: tokenizer_default), rendered by Axolotl's processor
    assert templates and all(t.startswith("<|im_start|>user <image>what colour is the image ?<|im_end|>")
                             for t in templates), templates
    assert re.search(r"mmtuning keep base answer: 'what colour is the image \?' -> ", text)


def test_keep_block_passes_axolotls_validation_and_images_without_a_processor_are_refused(keep_runs):
    results = json.loads((keep_runs / "keep_configs.json").read_text())
    good = results[str(keep_runs / "llava_keep.yml")]
    assert "error" not in good, good
    assert good["mmtuning"]["keep"]["prompts"] == KEEP["prompts"] and good["mmtuning"]["keep"]["target"] == "answers"
    bad = results[str(keep_runs / "bad_keep_processor.yml")]
    assert "error" in bad and "mmtuning.keep: the keep prompts carry images" in bad["error"], bad
    assert "processor_type: AutoProcessor" in bad["error"]


# --- a typical user YAML plus the two mmtuning lines ------------------------------------------------------


def module_r_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module`: its exact pattern entry, else the top-level value."""
    key = re.escape(module)
    return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])


def test_typical_user_yaml_plus_two_lines_trains_and_keeps_the_users_alpha_over_r(runs):
    """lora_r 32 / lora_alpha 16 / lora_dropout 0.05 are the block's defaults; a vision r of 8 keeps alpha/r 0.5;
    lora_target_linear is replaced by the plan with one warning; the adapter's top-level r/alpha are the
    language model's."""
    log = (runs["root"] / "llava_typical.log").read_text()
    assert ("mmtuning: effective LoRA settings: vision r=8 alpha=4, projector r=32 alpha=16, language r=32 "
            "alpha=16, dropout 0.05") in log
    assert log.count("lora_target_linear: True: Axolotl's LoRA targets are replaced by the mmtuning plan (38 "
                     "targets: vision 8 (r=8), projector 2 (r=32), language 28 (r=32))") == 1
    out = runs["root"] / "out_llava_typical"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (32, 16, 0.05)
    expected = {name: 8 if modality(name) == "vision" else 32 for name in expected_llava_modules()}
    assert adapter_modules(out) == expected
    for name, rank in expected.items():
        r, alpha = module_r_alpha(saved, name)
        assert r == rank and alpha / r == 0.5, (name, r, alpha)
    assert all(not math.isnan(x) for x in losses(runs["root"] / "llava_typical.log"))


def test_contradictions_are_refused_in_one_message_without_a_traceback(runs):
    """`axolotl train` with lora_r 32 vs mmtuning.r 8 and lora_alpha 16 vs mmtuning.alpha 64: both in one line."""
    log = (runs["root"] / "llava_refused.log").read_text()
    assert ("mmtuning: error: the Axolotl YAML: these Axolotl settings contradict the `mmtuning:` block: "
            "`lora_r: 32` vs `mmtuning.r: 8`") in log
    assert "`lora_alpha: 16` vs `mmtuning.alpha: 64`" in log
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def typical_merge(runs) -> dict:
    """`axolotl merge-lora` on the typical run (no --merge-method: the plugin's choice), compared with PEFT."""
    root = runs["root"]
    config = root / "llava_typical.yml"
    merge = subprocess.run([str(Path(PYTHON).parent / "axolotl"), "merge-lora", str(config),
                            "--lora-model-dir", str(root / "out_llava_typical")],
                           capture_output=True, text=True, env=env(), cwd=root, timeout=600)
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-4000:]
    compare = subprocess.run([PYTHON, str(DRIVER), "compare-merge", str(root / "llava"), str(root / "out_llava_typical"),
                              str(root / "out_llava_typical" / "merged"), str(root / "merge.json")],
                             capture_output=True, text=True, env=env(), cwd=root, timeout=600)
    assert compare.returncode == 0, compare.stderr[-4000:]
    return json.loads((root / "merge.json").read_text())


def test_axolotl_merge_lora_equals_peft_merge_in_every_modality(typical_merge):
    """Axolotl 0.21's default (memory-efficient) merge drops the language LoRA of LLaVA models; the plugin
    selects the legacy merge, so every adapted weight of every modality is merged, as PEFT merges it."""
    assert sorted(typical_merge) == ["language", "projector", "vision"]
    for kind, row in typical_merge.items():
        assert row["missing"] == [], kind
        assert row["weights"] > 0 and row["equal_to_peft"] == row["weights"], (kind, row)
        assert row["changed_from_base"] == row["weights"], (kind, row)


# Selective tuning (docs/selective.md) under `axolotl train`: no adapter at all, only base weights trained
# through modules_to_save (LayerNorm tuning on vision layer 2, the projector whole, SPIDER on the top LM layer).
SELECTIVE = {"vision": {"layers": {"top": 1}, "selective": "layernorm"}, "projector": {"selective": "full"},
             "language": {"layers": {"top": 1}, "selective": {"method": "spider", "mask_ratio": 0.5}}}


@pytest.fixture(scope="module")
def selective_run(tiny) -> Path:
    root, _ = tiny
    config = with_mmtuning(base_yaml(root, "llava", "llava_selective"))
    config["mmtuning"] = copy.deepcopy(SELECTIVE)
    (root / "llava_selective.yml").write_text(yaml.safe_dump(config))
    run_all(root, {"llava_selective": [*axolotl_cli(), str(root / "llava_selective.yml"), "--launcher", "python"]})
    return root


def test_selective_run_saves_exactly_the_planned_weights_with_one_group_per_modality(selective_run):
    from safetensors.torch import load_file

    out = selective_run / "out_llava_selective"
    saved = {k.removeprefix("base_model.model.") for k in load_file(str(out / "adapter_model.safetensors"))}
    vision, top = "model.vision_tower.encoder.layers.2.", "model.language_model.layers.3."
    expected = {vision + f"{norm}.{t}" for norm in ("layer_norm1", "layer_norm2") for t in ("weight", "bias")}
    expected |= {f"model.multi_modal_projector.linear_{i}.{t}" for i in (1, 2) for t in ("weight", "bias")}
    expected |= {top + f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                               "input_layernorm", "post_attention_layernorm")}
    assert saved == expected
    report = json.loads((out / "mmtuning_report.json").read_text())
    assert {g["name"]: g["tensors"] for g in report["optimizer_groups"]} == {"vision": 4, "projector": 4, "language": 9}
    values = losses(selective_run / "llava_selective.log")
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)


# --- FSDP2: Axolotl's launcher needs GPUs for 2+ processes ----------------------------------------------------

def axolotl_gpus() -> int:
    done = subprocess.run([PYTHON, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                          text=True, env=env() | {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def test_fsdp2_run_on_two_gpus_shards_through_accelerate_and_saves_a_plain_adapter(tiny, tmp_path):
    """`fsdp_version: 2` with the block on 2 GPUs. On CPU processes Axolotl's own start-up refuses 2+ processes (it
    asks CUDA for peer access: axolotl.utils.environment.check_cuda_p2p_support), so there this skips; Axolotl's
    trainer carries MMTuningTrainerMixin, which tests/test_fsdp.py runs sharded on 2 CPU processes."""
    if axolotl_gpus() < 2:
        pytest.skip("Axolotl's launcher needs 2+ GPUs for a sharded run (its start-up checks CUDA peer access); the "
                    "same trainer code runs sharded on CPU in tests/test_fsdp.py")
    root, _ = tiny
    config = with_mmtuning({**base_yaml(root, "llava", "fsdp"), "micro_batch_size": 1, "max_steps": 2, "bf16": True},
                           language={"modules": "all-linear", "r": 8, "schedule": {"type": "top_down", "start": 1,
                                                                                    "every": 1}})
    config.update(fsdp_version=2, fsdp_config={"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                                               "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                               "state_dict_type": "FULL_STATE_DICT"})
    path = tmp_path / "fsdp.yml"
    path.write_text(yaml.safe_dump(config))
    gpu_env = env() | {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")}
    done = subprocess.run([*axolotl_cli(), str(path), "--launcher", "torchrun", "--", "--nproc_per_node", "2"],
                          env=gpu_env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((root / "out_fsdp" / "mmtuning_report.json").read_text())
    assert report["sharding"]["sharded_by"] == "accelerate" and report["sharding"]["world_size"] == 2
    assert adapter_modules(root / "out_fsdp")
