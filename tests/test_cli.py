"""`mmtune inspect-targets` on full-size layouts (meta device), local dirs, specs and bad input."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mmtuning_plugin.cli import app
from mmtuning_plugin.testing.tiny import tiny_config

runner = CliRunner()

# Full-size default configs of transformers 5.x: (vision layers, vision Linear modules, projector modules,
# language layers, language Linear modules, vision layers whose output is used). Counted from the model
# definitions, not from mmtuning (LLaVA reads vision_feature_layer -2, so its last vision layer is unused).
FULL_SIZE = {
    "qwen2_5_vl": (32, 32 * 5, 2, 80, 80 * 7, 32),
    "llava": (24, 24 * 6, 2, 32, 32 * 7, 23),
    "idefics3": (12, 12 * 6, 1, 32, 32 * 7, 12),
    "gemma3": (12, 12 * 6, 0, 26, 26 * 7, 12),
    "mllama": (32 + 8, 40 * 6, 1, 40, 40 * 7, 40),
}


def run_json(*args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("model_type", sorted(FULL_SIZE))
def test_inspect_targets_json_on_full_size_layouts(model_type):
    vision_layers, vision_modules, projector_modules, language_layers, language_modules, usable = FULL_SIZE[model_type]
    report = run_json("inspect-targets", model_type, "--set", "vision.modules=attention", "--set", "vision.layers=top:4")
    modalities = report["modalities"]
    assert report["model_type"] == model_type
    assert (modalities["vision"]["layers"], len(modalities["vision"]["modules"])) == (vision_layers, vision_modules)
    assert len(modalities["projector"]["modules"]) == projector_modules
    assert (modalities["language"]["layers"], len(modalities["language"]["modules"])) == (language_layers, language_modules)
    assert all(m["params"] > 0 for m in modalities.values())
    plan = report["plan"]
    assert modalities["vision"]["usable_layers"] == usable
    assert modalities["vision"]["selected_layers"] == list(range(usable - 4, usable))
    assert set(modalities["vision"]["targeted"]) <= set(plan["target_modules"])
    assert len(plan["target_modules"]) == len(set(plan["target_modules"]))
    assert plan["trainable_params"] == sum(m["trainable_params"] for m in modalities.values())
    assert plan["rank_pattern"] == {} and plan["alpha_pattern"] == {}


def test_table_output_names_every_modality():
    result = runner.invoke(app, ["inspect-targets", "llava", "--set", "vision=true"])
    assert result.exit_code == 0
    for word in ("vision", "projector", "language", "total", "lora"):
        assert word in result.stdout


def test_spec_file_inside_a_host_yaml_and_set_overrides(tmp_path):
    spec = tmp_path / "axolotl.yml"
    spec.write_text("base_model: x\nmmtuning:\n  vision: {modules: attention, layers: {top: 2}, r: 8}\n  projector: false\n")
    report = run_json("inspect-targets", "llava", "--spec", str(spec), "--set", "language.r=4")
    assert report["modalities"]["vision"]["selected_layers"] == [21, 22]
    assert report["modalities"]["projector"]["targeted"] == []
    # the adapter's top-level r is the language rank (a rank modules use); only vision differs from it
    assert report["plan"]["r"] == 4 and set(report["plan"]["rank_pattern"].values()) == {8}


def test_local_model_directory(tmp_path):
    tiny_config("qwen2_vl").save_pretrained(tmp_path)
    report = run_json("inspect-targets", str(tmp_path), "--set", "vision=true")
    assert report["model_type"] == "qwen2_vl"
    assert report["modalities"]["vision"]["layers"] == 4
    assert len(report["modalities"]["vision"]["targeted"]) == 4 * 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect-targets", "not_a_model"], "Unknown model 'not_a_model'"),
        (["inspect-targets", "someone/uncached-model"], "not in the local Hugging Face cache"),
        (["inspect-targets", "llava", "--set", "vision.layers=top:99"], "asks for top 99 layers but there are only 23 (0-22 usable"),
        (["inspect-targets", "llava", "--set", "vision.modules=[wq]"], "'wq' matches no module"),
        (["inspect-targets", "llava", "--spec", "/nonexistent.yaml"], "no such file"),
        (["inspect-targets", "llava", "--set", "novalue"], "write KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_unreadable_config_exits_2(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = runner.invoke(app, ["inspect-targets", str(tmp_path)])
    assert result.exit_code == 2 and "is not valid JSON: Expecting property name" in result.stderr


def test_console_script_contract_in_a_real_process():
    """The installed entry point: exit code 2, message on stderr, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "mmtuning_plugin.cli", "inspect-targets", "nonsense"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "Unknown model 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr


def test_architectures_lists_builtin_maps():
    rows = run_json("architectures")
    types = {row["model_type"] for row in rows}
    assert {"llava", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "paligemma", "mistral3", "mllama",
            "internvl", "aya_vision", "llava_next", "llava_onevision", "qwen2_vl"} <= types
