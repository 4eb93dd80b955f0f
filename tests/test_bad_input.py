"""Bad input, table-driven: every case exits 2 (or raises MMTuningError in the Python API) with one paragraph
that names what was wrong and what to write instead, no traceback, no unexpected-error fallback, no output
written, and every input file byte-identical afterwards (hashes before/after).

One tiny LLaVA base and adapter on disk are shared by all cases; each case only parses and validates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmtuning_plugin.cli import app
from mmtuning_plugin.errors import MMTuningError

from mmtuning_plugin.testing.tiny import tiny_config, tiny_model

runner = CliRunner()
BINARY = bytes(range(256)) * 8
LF_GOOD = {"model_name_or_path": "llava", "stage": "sft", "do_train": True, "dataset": "x", "output_dir": "o",
           "mmtuning": {"vision": {"layers": {"top": 2}}}}


def _adapter_dir(root: Path, name: str, base: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llava"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=r".*(multi_modal_projector\.linear_1|language_model.*(q_proj|v_proj))"))
    out = root / name
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _variant(root: Path, source: Path, name: str, edit) -> Path:
    target = root / name
    shutil.copytree(source, target)
    edit(target)
    return target


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        path = folder / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
    return edit


def _write(name: str, content):
    def edit(folder: Path) -> None:
        path = folder / name
        path.unlink()
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return edit


def _header_only(path: Path, header: dict) -> None:
    """A safetensors file whose header is valid JSON of the wrong shape."""
    import struct

    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)


def _yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs under `inputs/` (hashed), outputs under `outs/`: a tiny base, adapters and broken variants."""
    root = tmp_path_factory.mktemp("bad")
    inputs = root / "inputs"
    inputs.mkdir()
    base = inputs / "base"
    tiny_model("llava").save_pretrained(base, max_shard_size="300KB")
    adapter = _adapter_dir(inputs, "adapter", base, 1)
    p = {"base": base, "adapter": adapter, "adapter2": _adapter_dir(inputs, "adapter2", base, 2), "root": root,
         "outs": root / "outs", "inputs": inputs}
    p["outs"].mkdir()
    tiny_config("qwen2_vl").save_pretrained(inputs / "qwen")
    variants = {
        "config_list": ("adapter_config.json", _write("adapter_config.json", "[1, 2]")),
        "config_binary": ("", _write("adapter_config.json", BINARY)),
        "config_broken": ("", _write("adapter_config.json", '{"r": 4,')),
        "alpha_null": ("", _edit_json("adapter_config.json", lambda d: {**d, "lora_alpha": None})),
        "r_text": ("", _edit_json("adapter_config.json", lambda d: {**d, "r": "four"})),
        "pattern_list": ("", _edit_json("adapter_config.json", lambda d: {**d, "rank_pattern": [1]})),
        "no_base_name": ("", _edit_json("adapter_config.json", lambda d: {**d, "base_model_name_or_path": None})),
        "peft_ia3": ("", _edit_json("adapter_config.json", lambda d: {**d, "peft_type": "IA3"})),
        "dora": ("", _edit_json("adapter_config.json", lambda d: {**d, "use_dora": True})),
        "weights_binary": ("", _write("adapter_model.safetensors", BINARY)),
        "weights_empty": ("", _write("adapter_model.safetensors", b"")),
        "weights_missing": ("", lambda f: (f / "adapter_model.safetensors").unlink()),
        "config_missing": ("", lambda f: (f / "adapter_config.json").unlink()),
        "weights_dir": ("", lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "adapter_model.safetensors").mkdir())),
    }
    for name, (_, edit) in variants.items():
        p[name] = _variant(inputs, adapter, name, edit)
    p["base_qwen_name"] = _variant(inputs, adapter, "base_qwen_name", _edit_json(
        "adapter_config.json", lambda d: {**d, "base_model_name_or_path": str(inputs / "qwen")}))
    # bases whose files are wrong
    p["base_wide"] = _variant(inputs, base, "base_wide", _edit_json(  # weights of one size, config.json of another
        "config.json", lambda d: {**d, "text_config": {**d["text_config"], "intermediate_size": 256}}))
    p["base_nojson"] = _variant(inputs, base, "base_nojson", lambda f: (f / "config.json").unlink())
    p["base_noweights"] = _variant(inputs, base, "base_noweights",
                                   lambda f: [x.unlink() for x in f.glob("model*.safetensors*")])
    p["base_badshard"] = _variant(inputs, base, "base_badshard", lambda f: sorted(f.glob("model-*.safetensors"))[0]
                                  .write_bytes(BINARY))
    p["base_badheader"] = _variant(inputs, base, "base_badheader", lambda f: _header_only(
        sorted(f.glob("model-*.safetensors"))[0], {"x": {"dtype": "F32"}}))
    p["base_badindex"] = _variant(inputs, base, "base_badindex", _write("model.safetensors.index.json", "{broken"))
    # model directories for inspect-targets
    for name, content in {"cfg_broken": "{not json", "cfg_list": "[1]", "cfg_unknown": '{"model_type": "not_a_type_x"}',
                          "cfg_notype": '{"hidden_size": 4}', "cfg_binary": BINARY,
                          "cfg_text_only": '{"model_type": "llama"}'}.items():
        folder = inputs / name
        folder.mkdir()
        (folder / "config.json").write_bytes(content) if isinstance(content, bytes) else (folder / "config.json").write_text(content)
        p[name] = folder
    for name in ("empty_dir", "qwen"):
        p[name] = inputs / name
    p["empty_dir"].mkdir()
    p["a_file"] = inputs / "a_file"
    p["a_file"].write_text("not a directory\n")
    p["binary"] = inputs / "binary.bin"
    p["binary"].write_bytes(BINARY)
    # --spec files
    specs = {"spec_list": "- 1\n- 2\n", "spec_bad_yaml": "vision: [unclosed\n", "spec_scalar": "42\n",
             "spec_rank": "mmtuning:\n  language: {rank: 8}\n", "spec_off_layers": "vision: {enabled: false, layers: {top: 2}}\n",
             "spec_top0": "vision: {layers: {top: 0}}\n", "spec_quant_q": "quant: all-4bit\n",
             "spec_lora_alpha": "lora_alpha: 16\n", "spec_vision_off_r": "vision: false\n"}
    for name, text in specs.items():
        p[name] = inputs / f"{name}.yaml"
        p[name].write_text(text)
    tiny_config("gemma3").save_pretrained(inputs / "gemma3")  # its projector is a bare weight (no dropout)
    # --probe data: an empty JSONL, and one good item (for the refusals that come after reading it)
    p["probe_empty"] = inputs / "probe_empty.jsonl"
    p["probe_empty"].write_text("\n")
    from PIL import Image

    Image.new("RGB", (24, 24), (200, 30, 30)).save(inputs / "red.png")
    p["probe_good"] = inputs / "probe_good.jsonl"
    p["probe_good"].write_text(json.dumps({"image": "red.png", "question": "what colour?", "answer": "red"}) + "\n")
    # LLaMA-Factory training YAMLs (argument-level errors only: the core venv has no llamafactory)
    lf = {"lf_no_block": {k: v for k, v in LF_GOOD.items() if k != "mmtuning"},
          "lf_owned": {**LF_GOOD, "additional_target": "embed_tokens"},
          "lf_contradiction": {**LF_GOOD, "lora_rank": 32, "mmtuning": {**LF_GOOD["mmtuning"], "r": 8}}, "lf_full": {**LF_GOOD, "finetuning_type": "full"},
          "lf_stage": {**LF_GOOD, "stage": "kto_pair_x"}, "lf_block_rank": {**LF_GOOD, "mmtuning": {"language": {"rank": 4}}},
          "lf_block_list": {**LF_GOOD, "mmtuning": [1, 2]}, "lf_good": LF_GOOD,
          "lf_gemma_dropout": {**LF_GOOD, "model_name_or_path": str(inputs / "gemma3"), "lora_dropout": 0.05},
          "lf_off_layers": {**LF_GOOD, "mmtuning": {"vision": {"enabled": False, "layers": "top:2"}}}}
    for name, data in lf.items():
        p[name] = _yaml(inputs / f"{name}.yaml", data)
    (inputs / "lf_list.yaml").write_text("- a\n")
    p["lf_list"] = inputs / "lf_list.yaml"
    return p


def _hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def hashes(world):
    return _hashes(world["inputs"])


def _fill(arg: str, world: dict, out: Path) -> str:
    """`{adapter}` -> the fixture's path, `{out}` -> this case's output; other braces (`{top: 0}`) stay."""
    paths = {**{k: v for k, v in world.items() if isinstance(v, Path)}, "out": out}
    return re.sub(r"\{(\w+)\}", lambda m: str(paths[m[1]]) if m[1] in paths else m[0], arg)


# (id, argv with {placeholders} of the world fixture and {out}, words the message must hold)
ADAPTER = "{adapter}"
CLI_CASES = [
    # --- inspect-targets: MODEL
    ("model-unknown-name", ["inspect-targets", "not_a_model"], ["Unknown model 'not_a_model'", "mmtune architectures"]),
    ("model-uncached-hub-id", ["inspect-targets", "someone/uncached"], ["not in the local Hugging Face cache"]),
    ("model-config-file", ["inspect-targets", "{base}/config.json"], ["is a file", "pass its directory", "{base}"]),
    ("model-other-file", ["inspect-targets", "{a_file}"], ["is a file", "model directory"]),
    ("model-missing-json-path", ["inspect-targets", "/nonexistent/config.json"], ["does not exist"]),
    ("model-empty-dir", ["inspect-targets", "{empty_dir}"], ["without a config.json"]),
    ("model-broken-json", ["inspect-targets", "{cfg_broken}"], ["is not valid JSON", "line 1, column 2", "re-download"]),
    ("model-json-list", ["inspect-targets", "{cfg_list}"], ["holds a JSON list", "not an object"]),
    ("model-unknown-type", ["inspect-targets", "{cfg_unknown}"], ["model_type 'not_a_type_x' is unknown", "JSON itself is fine", "register_architectures"]),
    ("model-no-type", ["inspect-targets", "{cfg_notype}"], ["has no `model_type`"]),
    ("model-binary-config", ["inspect-targets", "{cfg_binary}"], ["binary file, not text"]),
    ("model-text-only", ["inspect-targets", "{cfg_text_only}"], ["not an image-text-to-text model"]),
    ("model-text-only-type", ["inspect-targets", "llama"], ["not an image-text-to-text model"]),
    # --- inspect-targets: --spec
    ("spec-missing", ["inspect-targets", "llava", "--spec", "/nonexistent.yaml"], ["no such file"]),
    ("spec-directory", ["inspect-targets", "llava", "--spec", "{empty_dir}"], ["is a directory", "YAML file"]),
    ("spec-binary", ["inspect-targets", "llava", "--spec", "{binary}"], ["binary file, not text", "YAML file"]),
    ("spec-list", ["inspect-targets", "llava", "--spec", "{spec_list}"], ["expected a mapping"]),
    ("spec-scalar", ["inspect-targets", "llava", "--spec", "{spec_scalar}"], ["expected a mapping"]),
    ("spec-bad-yaml", ["inspect-targets", "llava", "--spec", "{spec_bad_yaml}"], ["not valid YAML", "line 2"]),
    ("spec-unknown-key-rank", ["inspect-targets", "llava", "--spec", "{spec_rank}"], ["language.rank", "did you mean `r`"]),
    ("spec-lora-alpha", ["inspect-targets", "llava", "--spec", "{spec_lora_alpha}"], ["lora_alpha", "did you mean `alpha`"]),
    ("spec-off-with-layers", ["inspect-targets", "llava", "--spec", "{spec_off_layers}"], ["vision.layers", "vision is disabled"]),
    ("spec-top-0", ["inspect-targets", "llava", "--spec", "{spec_top0}"], ["{top: 0} selects no layer", "{top: 1}"]),
    ("spec-quant-vs-option", ["inspect-targets", "llava", "--spec", "{spec_quant_q}", "--quant", "balanced"],
     ["--quant balanced contradicts", "all-4bit"]),
    ("spec-off-then-set-r", ["inspect-targets", "llava", "--spec", "{spec_vision_off_r}", "--set", "vision.r=8"],
     ["vision.r", "vision is disabled"]),
    # --- inspect-targets: --set
    ("set-no-equals", ["inspect-targets", "llava", "--set", "novalue"], ["write KEY=VALUE"]),
    ("set-empty-key", ["inspect-targets", "llava", "--set", "=3"], ["write KEY=VALUE"]),
    ("set-off-then-layers", ["inspect-targets", "llava", "--set", "vision=false", "--set", "vision.layers=top:2"],
     ["vision.layers", "vision is disabled", "--set vision=true"]),
    ("set-layers-then-off", ["inspect-targets", "llava", "--set", "vision.layers=top:2", "--set", "vision=false"],
     ["vision.layers", "vision is disabled"]),
    ("set-off-then-lr", ["inspect-targets", "llava", "--set", "language=false", "--set", "language.lr=2"], ["language.lr", "disabled"]),
    ("set-quant-preset-vs-option", ["inspect-targets", "llava", "--quant", "balanced", "--set", "quant.preset=all-4bit"],
     ["--quant balanced contradicts", "all-4bit"]),
    ("set-quant-bad-preset", ["inspect-targets", "llava", "--quant", "fp3"], ["unknown preset 'fp3'", "balanced"]),
    ("set-unknown-top-key", ["inspect-targets", "llava", "--set", "rank=8"], ["mmtuning.rank", "did you mean `r`"]),
    ("set-unknown-modality-key", ["inspect-targets", "llava", "--set", "vision.target_modules=[q_proj]"],
     ["vision.target_modules", "did you mean `modules`"]),
    ("set-unknown-quant-key", ["inspect-targets", "llava", "--set", "quant.visoin=none"], ["quant.visoin", "did you mean `vision`"]),
    ("set-top-0", ["inspect-targets", "llava", "--set", "vision.layers={top: 0}"], ["selects no layer", "{top: 1}"]),
    ("set-bottom-negative", ["inspect-targets", "llava", "--set", "vision.layers={bottom: -2}"], ["selects no layer"]),
    ("set-fraction-2", ["inspect-targets", "llava", "--set", "vision.layers={fraction: 2}"], ["(0, 1]"]),
    ("set-top-text", ["inspect-targets", "llava", "--set", "vision.layers={top: many}"], ["whole number of layers"]),
    ("set-layers-true", ["inspect-targets", "llava", "--set", "vision.layers=true"], ["not true/false"]),
    ("set-layers-range-backwards", ["inspect-targets", "llava", "--set", "vision.layers=[7-4]"], ["runs backwards"]),
    ("set-top-too-many", ["inspect-targets", "llava", "--set", "vision.layers=top:99"], ["asks for top 99 layers"]),
    ("set-index-out-of-range", ["inspect-targets", "llava", "--set", "language.layers=[99]"], ["do not exist"]),
    ("set-module-unknown", ["inspect-targets", "llava", "--set", "vision.modules=[wq]"], ["'wq' matches no module"]),
    ("set-modules-empty", ["inspect-targets", "llava", "--set", "language.modules=[]"], ["empty list selects nothing"]),
    ("set-r-zero", ["inspect-targets", "llava", "--set", "r=0"], ["mmtuning.r", "greater than or equal to 1"]),
    ("set-alpha-negative", ["inspect-targets", "llava", "--set", "alpha=-1"], ["mmtuning.alpha"]),
    ("set-dropout-one", ["inspect-targets", "llava", "--set", "dropout=1"], ["mmtuning.dropout"]),
    ("set-method-unknown", ["inspect-targets", "llava", "--set", "method=qlora"], ["mmtuning.method"]),
    ("set-dora-ia3", ["inspect-targets", "llava", "--set", "method=ia3", "--set", "use_dora=true"], ["need method: lora"]),
    ("set-all-off", ["inspect-targets", "llava", "--set", "projector=false", "--set", "language=false"], ["every modality is disabled"]),
    ("set-full-vision", ["inspect-targets", "llava", "--set", "vision.full=true"], ["only the projector can be trained whole"]),
    ("set-include-wrong", ["inspect-targets", "llava", "--set", "vision.include=[lm_head]"], ["do not belong to vision"]),
    # --- selective tuning (issue 17)
    ("set-selective-full-4bit", ["inspect-targets", "llava", "--quant", "all-4bit", "--set", "language.selective=full"],
     ["selective: full", "load quantized (language: nf4)", "quant: {language: none}", "quant.keep_16bit"]),
    ("set-selective-bias-4bit-vision", ["inspect-targets", "llava", "--quant", "all-4bit", "--set", "vision.layers=top:1",
                                        "--set", "vision.selective=bias"], ["selective: bias", "quant: {vision: none}"]),
    ("set-spider-ratio-0", ["inspect-targets", "llava", "--set", "language.selective={method: spider, mask_ratio: 0}"],
     ["language.selective", "mask_ratio 0 is outside (0, 1]", "0.1"]),
    ("set-spider-ratio-above-1", ["inspect-targets", "llava", "--set", "language.selective.method=spider",
                                  "--set", "language.selective.mask_ratio=1.5"], ["mask_ratio 1.5 is outside (0, 1]"]),
    ("set-ratio-without-spider", ["inspect-targets", "llava", "--set", "language.selective={method: full, mask_ratio: 0.2}"],
     ["mask_ratio belongs to method spider", "{method: spider, mask_ratio: 0.2}"]),
    ("set-bias-without-biases", ["inspect-targets", "llava", "--set", "language.selective=bias"],
     ["bias finds nothing to train", "has no bias", "selective: layernorm"]),
    ("set-layernorm-no-norms", ["inspect-targets", "llava", "--set", "projector.selective=layernorm"],
     ["layernorm finds nothing to train", "projector", "no normalization layer"]),
    ("set-selective-with-rank", ["inspect-targets", "llava", "--set", "language.selective=full", "--set", "language.r=8"],
     ["language.r", "tuned selectively", "gets no adapter"]),
    ("set-selective-with-full", ["inspect-targets", "llava", "--set", "projector.selective=bias", "--set", "projector.full=true"],
     ["projector.full", "tuned selectively"]),
    ("set-layernorm-with-modules", ["inspect-targets", "llava", "--set", "language.selective=layernorm",
                                    "--set", "language.modules=mlp"], ["language.modules", "selective: layernorm"]),
    ("set-selective-full-bare-projector", ["inspect-targets", "gemma3", "--set", "projector.selective=full"],
     ["bare weight model.multi_modal_projector.mm_input_projection_weight", "projector: {full: true}"]),
    ("set-selective-layers-auto", ["inspect-targets", "llava", "--set", "language.selective=full", "--set", "language.layers=auto"],
     ["language.layers: auto", "tuned selectively", "{top: 2}"]),
    ("set-selective-unknown", ["inspect-targets", "llava", "--set", "language.selective=lora"], ["language.selective.method", "'layernorm'"]),
    ("set-parent-scalar", ["inspect-targets", "llava", "--set", "r=4", "--set", "r.x=1"], ["not a block of settings"]),
    ("set-loss-unknown", ["inspect-targets", "llava", "--set", "losses.ancor={weight: 1}"], ["unknown loss 'ancor'"]),
    ("set-loss-option-unknown", ["inspect-targets", "llava", "--set", "losses.anchor={wieght: 1}"],
     ["anchor.wieght", "did you mean `weight`"]),
    ("set-schedule-unknown", ["inspect-targets", "llava", "--set", "vision=true", "--set", "vision.schedule=sideways"],
     ["unknown schedule 'sideways'"]),
    ("set-lr-decay-projector", ["inspect-targets", "llava", "--set", "projector.lr_decay=0.5"], ["projector has no layers"]),
    ("steps-zero", ["inspect-targets", "llava", "--steps", "0"], ["--steps"]),
    # --- layers: auto and inspect-targets --probe
    ("auto-no-data", ["inspect-targets", "llava", "--set", "language.layers=auto"],
     ["language.layers", "none were given", "--probe DATA.jsonl", "MMTuningTrainer", "{top: 4}"]),
    ("auto-top-k-0", ["inspect-targets", "llava", "--set", "language.layers={auto: {top_k: 0}}"],
     ["layers.auto.top_k", "0 selects no layer", "top_k: 1 or more"]),
    ("auto-top-k-too-many", ["inspect-targets", "llava", "--set", "language.layers={auto: {top_k: 99}}"],
     ["top_k: 99 asks for more layers than this modality has (32", "top_k: 32 or less"]),
    ("auto-budget-below-a-layer", ["inspect-targets", "llava", "--set", "language.layers={auto: {budget: 10k}}"],
     ["budget: 10,000 trainable parameters select no layer", "(layer 0) need 1,249,280", "budget: 1,249,280 or more"]),
    ("auto-budget-text", ["inspect-targets", "llava", "--set", "language.layers={auto: {budget: lots}}"],
     ["cannot read 'lots' as a number of parameters", "2M"]),
    ("auto-top-k-and-budget", ["inspect-targets", "llava", "--set", "language.layers={auto: {top_k: 2, budget: 2M}}"],
     ["either top_k", "not both"]),
    ("auto-projector", ["inspect-targets", "llava", "--set", "projector.layers=auto"], ["projector.layers: auto", "vision and language"]),
    ("probe-missing-file", ["inspect-targets", "{base}", "--probe", "/nonexistent/task.jsonl"],
     ["--probe /nonexistent/task.jsonl: no such file", "JSONL"]),
    ("probe-empty-file", ["inspect-targets", "{base}", "--probe", "{probe_empty}"], ["holds no items", '"question"']),
    ("probe-model-type-only", ["inspect-targets", "llava", "--probe", "{probe_good}"],
     ["--probe needs the model's weights", "'llava' is not a local model directory"]),
    ("probe-model-without-processor", ["inspect-targets", "{base}", "--probe", "{probe_good}"],
     ["--probe: could not load the model and processor from {base}", "processor saved in it"]),
    ("probe-layers-given", ["inspect-targets", "{base}", "--probe", "{probe_good}", "--set", "language.layers=top:2"],
     ["--probe scores the layers of a modality with `layers: auto`", "--set language.layers=auto"]),
    # --- convert remap
    ("remap-missing-adapter", ["convert", "remap", "/nonexistent/adapter", "--out", "{out}"], ["no such directory"]),
    ("remap-adapter-is-file", ["convert", "remap", "{adapter}/adapter_config.json", "--out", "{out}"], ["is a file", "{adapter}"]),
    ("remap-empty-dir", ["convert", "remap", "{empty_dir}", "--out", "{out}"], ["adapter_config.json is missing"]),
    ("remap-config-list", ["convert", "remap", "{config_list}", "--out", "{out}"], ["holds a JSON list"]),
    ("remap-config-binary", ["convert", "remap", "{config_binary}", "--out", "{out}"], ["binary file, not text"]),
    ("remap-config-broken", ["convert", "remap", "{config_broken}", "--out", "{out}"], ["is not valid JSON"]),
    ("remap-alpha-null", ["convert", "remap", "{alpha_null}", "--out", "{out}"], ["lora_alpha: null", "positive number"]),
    ("remap-r-text", ["convert", "remap", "{r_text}", "--out", "{out}"], ['r: "four"', "whole number"]),
    ("remap-pattern-list", ["convert", "remap", "{pattern_list}", "--out", "{out}"], ["rank_pattern", "mapping"]),
    ("remap-ia3", ["convert", "remap", "{peft_ia3}", "--out", "{out}"], ["peft_type is IA3", "method: ia3, and mmtune convert works on LoRA deltas"]),
    ("remap-weights-binary", ["convert", "remap", "{weights_binary}", "--out", "{out}"], ["truncated or corrupt"]),
    ("remap-weights-empty", ["convert", "remap", "{weights_empty}", "--out", "{out}"], ["truncated or corrupt"]),
    ("remap-weights-missing", ["convert", "remap", "{weights_missing}", "--out", "{out}"], ["is missing", "safetensors"]),
    ("remap-weights-dir", ["convert", "remap", "{weights_dir}", "--out", "{out}"], ["is missing"]),
    ("remap-config-missing", ["convert", "remap", "{config_missing}", "--out", "{out}"], ["adapter_config.json is missing"]),
    ("remap-no-base-name", ["convert", "remap", "{no_base_name}", "--out", "{out}"], ["no base_model_name_or_path", "--base"]),
    ("remap-wrong-base-type", ["convert", "remap", ADAPTER, "--base", "qwen2_vl", "--from", "5.x", "--out", "{out}"], ["do not fit"]),
    ("remap-wrong-base-dir", ["convert", "remap", "{base_qwen_name}", "--out", "{out}"], ["do not fit"]),
    ("remap-base-unknown", ["convert", "remap", ADAPTER, "--base", "not_a_model", "--out", "{out}"], ["Unknown model"]),
    ("remap-base-config-file", ["convert", "remap", ADAPTER, "--base", "{base}/config.json", "--out", "{out}"], ["pass its directory"]),
    ("remap-bad-to", ["convert", "remap", ADAPTER, "--to", "6.x", "--out", "{out}"], ["--to"]),
    ("remap-bad-from", ["convert", "remap", ADAPTER, "--from", "4.0", "--out", "{out}"], ["--from"]),
    ("remap-out-exists", ["convert", "remap", ADAPTER, "--out", "{empty_dir}"], ["already exists", "--force"]),
    ("remap-out-inside-input", ["convert", "remap", ADAPTER, "--out", "{adapter}/converted"], ["overlaps the input"]),
    ("remap-out-is-input", ["convert", "remap", ADAPTER, "--out", ADAPTER, "--force"], ["overlaps the input"]),
    ("remap-out-parent-file", ["convert", "remap", ADAPTER, "--out", "{a_file}/sub/out"], ["is a file, not a directory"]),
    ("remap-out-file-exists", ["convert", "remap", ADAPTER, "--out", "{a_file}"], ["already exists"]),
    # --- convert merge
    ("merge-base-missing", ["convert", "merge", ADAPTER, "--base", "/nonexistent/base", "--out", "{out}"], ["--base", "no such directory"]),
    ("merge-base-config-file", ["convert", "merge", ADAPTER, "--base", "{base}/config.json", "--out", "{out}"], ["--base", "is a file", "{base}"]),
    ("merge-base-no-json", ["convert", "merge", ADAPTER, "--base", "{base_nojson}", "--out", "{out}"], ["not a model directory with config.json"]),
    ("merge-base-no-weights", ["convert", "merge", ADAPTER, "--base", "{base_noweights}", "--out", "{out}"], ["neither", "safetensors"]),
    ("merge-base-bad-shard", ["convert", "merge", ADAPTER, "--base", "{base_badshard}", "--out", "{out}"], ["truncated or corrupt"]),
    ("merge-base-bad-header", ["convert", "merge", ADAPTER, "--base", "{base_badheader}", "--out", "{out}"],
     ["is corrupt", "lack a dtype, shape or data offsets"]),
    ("merge-base-bad-index", ["convert", "merge", ADAPTER, "--base", "{base_badindex}", "--out", "{out}"], ["not a valid safetensors index"]),
    ("merge-base-config-mismatch", ["convert", "merge", ADAPTER, "--base", "{base_wide}", "--out", "{out}"],
     ["do not match its config.json", "mlp"]),
    ("merge-base-other-type", ["convert", "merge", ADAPTER, "--base", "{qwen}", "--out", "{out}"], ["do not fit"]),
    ("merge-dtype", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--dtype", "fp8"], ["--dtype 'fp8'", "bf16"]),
    ("merge-device-gpu", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--device", "gpu"],
     ["--device 'gpu'", "cuda:N"]),
    ("merge-device-cuda-99", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--device", "cuda:99"], ["--device cuda:99"]),
    ("merge-device-mps", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--device", "meta"], ["cpu or cuda"]),
    ("merge-4bit-type", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--dequantize-4bit", "int3"], ["nf4 or fp4"]),
    ("merge-blocksize", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--dequantize-4bit", "nf4",
                         "--blocksize", "100"], ["--blocksize 100", "64"]),
    ("merge-blocksize-without-4bit", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--blocksize", "128"],
     ["only apply with --dequantize-4bit"]),
    ("merge-skip-without-4bit", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{out}", "--skip-4bit", "x"],
     ["only apply with --dequantize-4bit"]),
    ("merge-out-exists", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{empty_dir}"], ["already exists", "--force"]),
    ("merge-out-in-base", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{base}/merged"], ["overlaps the input"]),
    ("merge-out-parent-file", ["convert", "merge", ADAPTER, "--base", "{base}", "--out", "{a_file}/m"], ["is a file, not a directory"]),
    ("merge-alpha-null", ["convert", "merge", "{alpha_null}", "--base", "{base}", "--out", "{out}"], ["lora_alpha: null"]),
    ("merge-no-base-option", ["convert", "merge", ADAPTER, "--out", "{out}"], ["--base"]),
    # --- convert resize
    ("resize-no-rank", ["convert", "resize", ADAPTER, "--out", "{out}"], ["needs --rank"]),
    ("resize-rank-zero", ["convert", "resize", ADAPTER, "--rank", "0", "--out", "{out}"], ["at least 1"]),
    ("resize-per-modality-text", ["convert", "resize", ADAPTER, "--per-modality", "vision=x", "--out", "{out}"], ["MODALITY=RANK"]),
    ("resize-per-modality-unknown", ["convert", "resize", ADAPTER, "--per-modality", "audio=4", "--out", "{out}"], ["MODALITY=RANK"]),
    ("resize-per-modality-absent", ["convert", "resize", ADAPTER, "--per-modality", "vision=2", "--out", "{out}"],
     ["no module of that modality"]),
    ("resize-alpha-null", ["convert", "resize", "{alpha_null}", "--rank", "2", "--out", "{out}"], ["lora_alpha: null"]),
    ("resize-config-list", ["convert", "resize", "{config_list}", "--rank", "2", "--out", "{out}"], ["holds a JSON list"]),
    ("resize-out-exists", ["convert", "resize", ADAPTER, "--rank", "2", "--out", "{empty_dir}"], ["already exists"]),
    ("resize-rank-text", ["convert", "resize", ADAPTER, "--rank", "two", "--out", "{out}"], ["--rank"]),
    # --- convert split
    ("split-keep-unknown", ["convert", "split", ADAPTER, "--keep", "audio", "--out", "{out}"], ["--keep 'audio'"]),
    ("split-keep-empty", ["convert", "split", ADAPTER, "--keep", ",", "--out", "{out}"], ["--keep"]),
    ("split-keep-absent", ["convert", "split", ADAPTER, "--keep", "vision", "--out", "{out}"], ["no module of vision"]),
    ("split-keep-all", ["convert", "split", ADAPTER, "--keep", "language,projector", "--out", "{out}"], ["nothing to split off"]),
    ("split-merge-rest-missing", ["convert", "split", ADAPTER, "--keep", "language", "--merge-rest-into", "/nonexistent/base",
                                  "--out", "{out}"], ["--merge-rest-into", "no such directory"]),
    ("split-merge-rest-file", ["convert", "split", ADAPTER, "--keep", "language", "--merge-rest-into", "{base}/config.json",
                               "--out", "{out}"], ["--merge-rest-into", "is a file"]),
    ("split-merge-rest-no-json", ["convert", "split", ADAPTER, "--keep", "language", "--merge-rest-into", "{base_nojson}",
                                  "--out", "{out}"], ["--merge-rest-into", "config.json"]),
    ("split-config-binary", ["convert", "split", "{config_binary}", "--keep", "language", "--out", "{out}"], ["binary file"]),
    ("split-out-inside", ["convert", "split", ADAPTER, "--keep", "language", "--out", "{adapter}/x"], ["overlaps the input"]),
    # --- convert combine
    ("combine-one-adapter", ["convert", "combine", ADAPTER, "--out", "{out}"], ["at least two adapters"]),
    ("combine-method", ["convert", "combine", ADAPTER, "{adapter2}", "--method", "svd", "--out", "{out}"], ["--method 'svd'"]),
    ("combine-weights-text", ["convert", "combine", ADAPTER, "{adapter2}", "--weights", "a,b", "--out", "{out}"], ["--weights"]),
    ("combine-weights-count", ["convert", "combine", ADAPTER, "{adapter2}", "--weights", "1", "--out", "{out}"], ["one per adapter"]),
    ("combine-density-zero", ["convert", "combine", ADAPTER, "{adapter2}", "--method", "ties", "--density", "0", "--out", "{out}"],
     ["--density"]),
    ("combine-density-linear", ["convert", "combine", ADAPTER, "{adapter2}", "--density", "0.3", "--out", "{out}"],
     ["only applies to ties"]),
    ("combine-seed-ties", ["convert", "combine", ADAPTER, "{adapter2}", "--method", "ties", "--seed", "3", "--out", "{out}"],
     ["only applies to dare"]),
    ("combine-rank-zero", ["convert", "combine", ADAPTER, "{adapter2}", "--rank", "0", "--out", "{out}"], ["at least 1"]),
    ("combine-other-base", ["convert", "combine", ADAPTER, "{base_qwen_name}", "--out", "{out}"], ["different base models"]),
    ("combine-null-alpha", ["convert", "combine", ADAPTER, "{alpha_null}", "--out", "{out}"], ["lora_alpha: null"]),
    ("combine-out-is-input", ["convert", "combine", ADAPTER, "{adapter2}", "--out", "{adapter2}", "--force"], ["overlaps the input"]),
    # --- convert export (the world's adapter has rank 4, which vLLM does not serve)
    ("export-dora", ["convert", "export", "{dora}", "--for", "vllm", "--base", "{base}", "--out", "{out}"],
     ["DoRA adapter", "merge_and_unload", "use_dora: false"]),
    ("export-rank", ["convert", "export", ADAPTER, "--for", "vllm", "--base", "{base}", "--out", "{out}"],
     ["vLLM serves LoRA ranks 1, 8, 16", "rank 4 (model.language_model.layers.0.self_attn.q_proj", "nearest allowed: 1 or 8",
      "--pad-ranks"]),
    ("export-no-base", ["convert", "export", ADAPTER, "--for", "vllm", "--out", "{out}"], ["Missing option", "--base"]),
    ("export-no-for", ["convert", "export", ADAPTER, "--base", "{base}", "--out", "{out}"], ["Missing option", "--for"]),
    ("export-for-unknown", ["convert", "export", ADAPTER, "--for", "tgi", "--base", "{base}", "--out", "{out}"],
     ["--for 'tgi'", "--for vllm", "--for transformers"]),
    ("export-tower-for-transformers", ["convert", "export", ADAPTER, "--for", "transformers", "--tower-lora", "--base",
                                      "{base}", "--out", "{out}"], ["--tower-lora", "--for vllm"]),
    ("export-base-missing", ["convert", "export", ADAPTER, "--for", "transformers", "--base", "/nonexistent/base", "--out",
                             "{out}"], ["--base", "no such directory"]),
    ("export-out-exists", ["convert", "export", ADAPTER, "--for", "transformers", "--base", "{base}", "--out", "{empty_dir}"],
     ["already exists", "--force"]),
    ("export-out-in-base", ["convert", "export", ADAPTER, "--for", "vllm", "--pad-ranks", "--base", "{base}", "--out",
                            "{base}/served"], ["overlaps the input"]),
    # --- demo (refused before any training)
    ("demo-out-user-files", ["demo", "--steps", "1", "--out", "{inputs}"], ["not an earlier demo's output"]),
    ("demo-out-file", ["demo", "--steps", "1", "--out", "{a_file}"], ["not an earlier demo's output"]),
    ("demo-out-parent-file", ["demo", "--steps", "1", "--out", "{a_file}/run"], ["is a file, not a directory"]),
    ("demo-steps-zero", ["demo", "--steps", "0"], ["--steps"]),
    ("demo-threads-zero", ["demo", "--threads", "0"], ["--threads"]),
    # --- llamafactory train (argument level: before LLaMA-Factory is imported)
    ("lf-missing", ["llamafactory", "train", "/nonexistent.yaml"], ["no such file"]),
    ("lf-directory", ["llamafactory", "train", "{empty_dir}"], ["is a directory"]),
    ("lf-binary", ["llamafactory", "train", "{binary}"], ["binary file, not text"]),
    ("lf-not-yaml", ["llamafactory", "train", "{spec_bad_yaml}"], ["not valid YAML"]),
    ("lf-list", ["llamafactory", "train", "{lf_list}"], ["expected a mapping"]),
    ("lf-no-block", ["llamafactory", "train", "{lf_no_block}"], ["no `mmtuning:` block"]),
    ("lf-owned-key", ["llamafactory", "train", "{lf_owned}"], ["additional_target", "conflict"]),
    ("lf-contradiction", ["llamafactory", "train", "{lf_contradiction}"], ["`lora_rank: 32` vs `mmtuning.r: 8`"]),
    ("lf-gemma3-dropout", ["llamafactory", "train", "{lf_gemma_dropout}"],
     ["`lora_dropout: 0.05` (gemma3's projector is the bare weight", "write `lora_dropout: 0` or remove it"]),
    ("lf-finetuning-full", ["llamafactory", "train", "{lf_full}"], ["finetuning_type: full"]),
    ("lf-stage", ["llamafactory", "train", "{lf_stage}"], ["stage: kto_pair_x"]),
    ("lf-block-rank", ["llamafactory", "train", "{lf_block_rank}"], ["language.rank", "did you mean `r`"]),
    ("lf-block-list", ["llamafactory", "train", "{lf_block_list}"], ["expected a mapping"]),
    ("lf-off-layers", ["llamafactory", "train", "{lf_off_layers}"], ["vision.layers", "vision is disabled"]),
    ("lf-override-no-equals", ["llamafactory", "train", "{lf_good}", "max_steps"], ["write KEY=VALUE"]),
    ("lf-override-block", ["llamafactory", "train", "{lf_good}", "mmtuning.vision.rank=4"], ["did you mean `r`"]),
]


@pytest.mark.parametrize("case, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input(world, hashes, case, argv, words):
    out = world["outs"] / case
    result = runner.invoke(app, [_fill(a, world, out) for a in argv])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "bug in mmtune" not in text, text
    for word in words:
        assert " ".join(_fill(word, world, out).split()) in text, (word, text)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "no output, no temporary left"
    assert _hashes(world["inputs"]) == hashes, "inputs untouched"


def _load_config(data):
    from mmtuning_plugin.config import load_config

    return load_config(data)


def _session(data):
    from mmtuning_plugin.session import MMTuning

    return MMTuning(data)


def _plan(data):
    from mmtuning_plugin.targets import plan_targets

    return plan_targets(tiny_model("llava"), data)


API_CASES = [
    ("api-config-list", lambda: _load_config([1]), ["expected a mapping"]),
    ("api-config-rank", lambda: _load_config({"rank": 8}), ["mmtuning.rank", "did you mean `r`"]),
    ("api-config-lora-r", lambda: _load_config({"language": {"lora_r": 8}}), ["did you mean `r`"]),
    ("api-config-off-layers", lambda: _load_config({"vision": {"enabled": False, "layers": {"top": 2}}}),
     ["vision.layers", "vision is disabled"]),
    ("api-config-off-modules", lambda: _load_config({"projector": {"enabled": False, "modules": "mlp"}}),
     ["projector.modules", "disabled"]),
    ("api-config-top-0", lambda: _load_config({"vision": {"layers": {"top": 0}}}), ["selects no layer"]),
    ("api-config-top-0-string", lambda: _load_config({"vision": {"layers": "top:0"}}), ["selects no layer"]),
    ("api-config-quant-key", lambda: _load_config({"quant": {"preset": "balanced", "langauge": "nf4"}}),
     ["did you mean `language`"]),
    ("api-session-off-r", lambda: _session({"vision": {"enabled": False, "r": 4}}), ["vision.r", "disabled"]),
    ("api-session-not-mapping", lambda: _session("vision"), ["expected a mapping"]),
    ("api-plan-top-99", lambda: _plan({"language": {"layers": {"top": 99}}}), ["asks for top 99"]),
    ("api-plan-module", lambda: _plan({"language": {"modules": ["wq"]}}), ["'wq' matches no module"]),
    ("api-plan-unknown-key", lambda: _plan({"language": {"rank": 3}}), ["did you mean `r`"]),
    ("api-plan-bias-without-biases", lambda: _plan({"language": {"selective": "bias"}}), ["has no bias"]),
    ("api-config-spider-ratio", lambda: _load_config({"vision": {"selective": {"method": "spider", "mask_ratio": -0.5}}}),
     ["mask_ratio -0.5 is outside (0, 1]"]),
    ("api-plan-full-4bit", lambda: _plan({"quant": "balanced", "language": {"selective": "spider"}}),
     ["load quantized (language: nf4)", "quant: {language: none}"]),
    ("api-plan-auto-no-data", lambda: _plan({"language": {"layers": "auto"}}),
     ["none were given", "MMTuning.wrap(model, probe_batches=...)", "train_dataset"]),
    ("api-wrap-auto-no-data", lambda: _session({"vision": {"layers": {"auto": 1}}}).wrap(tiny_model("llava")),
     ["mmtuning.vision.layers", "none were given"]),
    ("api-config-auto-top-0", lambda: _load_config({"language": {"layers": {"auto": {"top_k": 0}}}}), ["selects no layer"]),
    ("api-config-auto-budget-0", lambda: _load_config({"language": {"layers": {"auto": {"budget": "0M"}}}}),
     ["allows no trainable parameter"]),
]


@pytest.mark.parametrize("case, call, words", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api_refuses_bad_input(case, call, words):
    with pytest.raises(MMTuningError) as info:
        call()
    text = " ".join(str(info.value).split())
    for word in words:
        assert word in text, (word, text)


def test_convert_api_refuses_bad_devices_and_blocksizes(world):
    from mmtuning_plugin.convert.merge import FourBit, merge

    out = world["outs"] / "api-merge"
    for kwargs, word in (({"device": "gpu"}, "not a device name"), ({"device": "cuda:77"}, "cuda:77"),
                         ({"four_bit": FourBit("nf4", 48)}, "--blocksize 48"), ({"dtype": "int4"}, "--dtype 'int4'")):
        with pytest.raises(MMTuningError, match=word):
            merge(world["adapter"], world["base"], out, progress=False, **kwargs)
    assert not out.exists()


def test_unexpected_errors_are_one_paragraph_too():
    """The boundary's last row: a bug still exits 2 with one paragraph that says it is a bug (and how to see more)."""
    from mmtuning_plugin.errors import TRACEBACK_ENV, user_message

    message = user_message(KeyError("oops"))
    assert "bug in mmtune" in message and TRACEBACK_ENV in message
    assert user_message(KeyboardInterrupt()) is None
    os.environ[TRACEBACK_ENV] = "1"
    try:
        assert user_message(KeyError("oops")) is None and user_message(MMTuningError("x")) == "x"
    finally:
        del os.environ[TRACEBACK_ENV]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permission bits")
def test_permission_denied_is_one_paragraph(world, tmp_path):
    """An unreadable --spec and an --out in a directory without write permission (EACCES)."""
    spec = tmp_path / "secret.yaml"
    spec.write_text("vision: true\n")
    spec.chmod(0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(app, ["inspect-targets", "llava", "--spec", str(spec)])
        text = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and ("is not readable" in text or "cannot read it" in text), text  # typer checks first
        result = runner.invoke(app, ["convert", "remap", str(world["adapter"]), "--out", str(locked / "out")])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "permission denied" in text and "--out" in text, text
        assert list(locked.iterdir()) == []
    finally:
        spec.chmod(0o644)
        locked.chmod(0o755)
