"""LLaMA-Factory 0.9.5 integration, run for real: `mmtune llamafactory train` in LLaMA-Factory's own venv.

The runs are subprocesses of the venv that scripts/test builds (`llamafactory_venv` in scripts/env.sh) and
names in MMTUNING_LLAMAFACTORY_PYTHON. They train a tiny LLaVA for a few steps on CPU and check what was
saved and recorded. Pure-Python pieces (config splitting, conflicts, torchrun arguments) run in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conformance import SCENARIO, assert_conforms, check_report, read_report

from mmtuning_plugin.config import MMTuningConfig
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations import llamafactory as lf

ROOT = Path(__file__).resolve().parents[2]
LF_PYTHON = os.environ.get("MMTUNING_LLAMAFACTORY_PYTHON")
needs_lf = pytest.mark.skipif(
    not LF_PYTHON, reason="MMTUNING_LLAMAFACTORY_PYTHON is not set: run scripts/test, which builds the LLaMA-Factory "
    "venv (scripts/env.sh llamafactory_venv) and exports its python")

# LLaVA reads image features from the second-last vision layer (vision_feature_layer: -2): the last layer
# gets no gradient, so the vision adapter goes on layer -2, whose training is visible in the saved weights.
# vision layer -1 = the last layer LLaVA reads (vision_feature_layer -2): layer 2 of the tiny model's 4
BLOCK = {"vision": {"modules": "attention", "layers": [-1], "r": 4}, "projector": {"r": 8},
         "language": {"modules": "all-linear", "r": 8}}


def lf_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}


def run_lf(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LF_PYTHON, *args], cwd=ROOT, env={**lf_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny LLaVA checkpoint and a 4-row image dataset, written by the LLaMA-Factory venv's transformers."""
    root = tmp_path_factory.mktemp("lf")
    done = run_lf(str(ROOT / "tests/hosts/lf_fixture.py"), str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def write_config(tiny: Path, name: str, block: dict | None, **extra) -> Path:
    config = {
        "model_name_or_path": str(tiny / "model"), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "tiny", "dataset_dir": str(tiny / "data"), "template": "llava", "cutoff_len": 256,
        "output_dir": str(tiny / name), "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "overwrite_output_dir": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, **extra,
    }
    if block is not None:
        config["mmtuning"] = block
    path = tiny / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(tiny: Path, name: str, block: dict | None, *overrides: str, env: dict | None = None, **extra) -> Path:
    return train_logged(tiny, name, block, *overrides, env=env, **extra)[0]


def train_logged(tiny: Path, name: str, block: dict | None, *overrides: str, env: dict | None = None,
                 **extra) -> tuple[Path, subprocess.CompletedProcess]:
    config = write_config(tiny, name, block, **extra)
    done = run_lf("-m", "mmtuning_plugin.cli", "llamafactory", "train", str(config), *overrides, timeout=420,
                  **(env or {}))
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return tiny / name, done


def expected_modules(tiny: Path) -> dict[str, set[str]]:
    """BLOCK's targets on the tiny LLaVA, written out from its config.json (independent of the planner)."""
    config = json.loads((tiny / "model" / "config.json").read_text())
    layer = config["vision_config"]["num_hidden_layers"] - 2
    vision = {f"model.vision_tower.encoder.layers.{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    language = {f"model.language_model.layers.{i}.{p}" for i in range(config["text_config"]["num_hidden_layers"])
                for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    return {"vision": vision, "projector": {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"},
            "language": language}


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def adapted_modules(tensors: dict) -> set[str]:
    return {key.removeprefix("base_model.model.").split(".lora_")[0] for key in tensors}


# --- real runs ----------------------------------------------------------------------------------------


@needs_lf
def test_lora_run_adapts_projector_and_vision_as_planned_with_one_group_per_modality(tiny):
    out = train(tiny, "lora", BLOCK, "mmtuning.vision.r=2")  # an override reaches the block
    expected = expected_modules(tiny)
    tensors = adapter_tensors(out)
    assert adapted_modules(tensors) == set().union(*expected.values())
    for modality, rank in (("vision", 2), ("projector", 8), ("language", 8)):
        for module in expected[modality]:
            assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank, module
    # lora_B starts at zero: a non-zero B on the projector and in the vision tower means they trained
    for module in (*expected["projector"], *expected["vision"]):
        assert tensors[f"base_model.model.{module}.lora_B.weight"].abs().sum() > 0, module
    record = read_report(out)
    groups = {g["name"]: g for g in record["optimizer_groups"]}
    assert sorted(groups) == ["language", "projector", "vision"]
    assert groups["vision"]["tensors"] == 2 * len(expected["vision"])
    assert groups["projector"]["tensors"] == 2 * len(expected["projector"])
    assert groups["language"]["tensors"] == 2 * len(expected["language"])


@needs_lf
def test_layers_auto_probes_the_runs_own_first_batches_before_wrapping(tiny):
    """The probe and `init: corda` read the same first batches: the probe chooses the layer, corda starts it."""
    block = {"projector": False, "language": {"modules": "attention", "r": 4, "init": "corda",
                                              "layers": {"auto": {"top_k": 1, "batches": 2}}}}
    out = train(tiny, "auto", block, "max_steps=1")
    probe = read_report(out)["peft"]["probe"]  # plan.summary() in the one run report
    # 4 rows, 2 per batch: both batches probed, every answer token of the dataset ("a red circle ." + end) counted
    assert probe["batches"] == 2 and probe["answer_tokens"] >= 4 * 4, probe
    language = probe["modalities"]["language"]
    assert len(language["chosen"]) == 1 and [s["layer"] for s in language["layers"]] == [0, 1, 2, 3]
    best = max(language["layers"], key=lambda s: (s["score"], s["layer"]))
    assert language["chosen"] == [best["layer"]]
    layers = {int(m.split(".layers.")[1].split(".")[0]) for m in adapted_modules(adapter_tensors(out))}
    assert layers == set(language["chosen"])
    ranks = {tuple(t.shape)[0] for k, t in adapter_tensors(out).items() if "lora_A" in k}
    assert ranks == {8}  # corda's start and its frozen copy: 2r


TYPICAL_LORA = {"lora_rank": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": "all"}


def module_r_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module`: its exact pattern entry, else the top-level value."""
    key = re.escape(module)
    return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])


@needs_lf
def test_typical_llamafactory_yaml_plus_the_block_trains_and_keeps_the_users_alpha_over_r(tiny):
    """A user's YAML (`lora_rank: 32`, `lora_alpha: 16`, `lora_dropout: 0.05`, `lora_target: all`) plus an
    `mmtuning:` line trains unedited; every module keeps alpha/r = 0.5 and the dropout."""
    config = write_config(tiny, "typical", {"vision": {"modules": "attention", "layers": [-1], "r": 8}},
                          **TYPICAL_LORA)
    done = run_lf("-m", "mmtuning_plugin.cli", "llamafactory", "train", str(config), timeout=420)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert ("[mmtuning] effective LoRA settings: vision r=8 alpha=4, projector r=32 alpha=16, language r=32 "
            "alpha=16, dropout 0.05") in done.stderr
    assert "[mmtuning] warning: lora_target: all: LLaMA-Factory's LoRA targets are replaced by the mmtuning plan" in done.stderr
    out = tiny / "typical"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (32, 16, 0.05)  # the language defaults
    tensors = adapter_tensors(out)
    expected = expected_modules(tiny)
    assert adapted_modules(tensors) == set().union(*expected.values())
    for modality, rank in (("vision", 8), ("projector", 32), ("language", 32)):
        for module in expected[modality]:
            assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank, module
            r, alpha = module_r_alpha(saved, module)
            assert r == rank and alpha / r == 0.5, (module, r, alpha)


@needs_lf
def test_qlora_run_keeps_the_plan_on_4bit_layers(tiny):
    out = train(tiny, "qlora", BLOCK, quantization_bit=4)
    expected = expected_modules(tiny)
    assert adapted_modules(adapter_tensors(out)) == set().union(*expected.values())
    types = read_report(out)["base_layer_types"]
    assert {types[m] for m in expected["language"]} == {"Linear4bit"}
    assert {types[m] for m in expected["projector"] | expected["vision"]} <= {"Linear4bit", "Linear"}


@needs_lf
def test_conformance_scenario_keeps_policy_layers_16bit_and_reports_like_the_trainer(tiny, trainer_reference):
    """The host conformance scenario (tests/hosts/conformance.py: vision + projector + language, `quant: balanced`,
    a language schedule, the anchor loss): the policy's 16-bit modules are not Linear4bit, the quantization is
    verified as in Axolotl, and mmtuning_report.json equals the transformers Trainer's wherever the host cannot
    matter."""
    from transformers import AutoConfig

    from mmtuning_plugin.session import MMTuning

    # `balanced` keeps the first vision block, the last one LLaVA reads (2) and the projector 16-bit: the
    # scenario adapts vision layers 1 (quantized) and 2 (kept)
    policy = MMTuning(SCENARIO).bnb_config_kwargs(AutoConfig.from_pretrained(tiny / "model"))
    out, done = train_logged(tiny, "scenario", SCENARIO, "max_steps=3", quantization_bit=4)
    assert "[mmtuning] quantized exactly as the `quant:` policy says (balanced)" in done.stderr  # verified, as in Axolotl
    assert "[mmtuning] plan verified: vision 8 in layers 1-2 (r=4); projector 2 (r=8); language 28 in layers 0-3 (r=8)" \
        in done.stderr
    report = read_report(out)
    check_report(report, "llamafactory")
    assert_conforms(report, trainer_reference)
    types = report["base_layer_types"]
    skipped = policy["llm_int8_skip_modules"]
    kept = {m for m in types if any(m == s or m.startswith(s + ".") for s in skipped)}
    assert any(m.startswith("model.vision_tower.") for m in kept), skipped
    assert all(types[m] != "Linear4bit" for m in kept), {m: types[m] for m in kept}
    others = set(types) - kept
    assert any(m.startswith("model.vision_tower.") for m in others)  # layer 1: quantized, as the policy says
    assert all(types[m] == "Linear4bit" for m in others), {m: types[m] for m in others}
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert logged and all("loss_align/anchor" in entry for entry in logged)


@needs_lf
def test_configured_alignment_loss_is_logged(tiny):
    if "losses" not in MMTuningConfig.model_fields:
        pytest.skip("issue 6 not merged: MMTuningConfig has no `losses` key, so MMTuning.extra_losses returns "
                    "nothing to add or log")
    out = train(tiny, "align", {**BLOCK, "losses": {"contrastive": {"weight": 0.1}}})
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert logged and all("loss_align/contrastive" in entry for entry in logged)


@needs_lf
def test_moe_lora_trains_through_llamafactory_with_its_balance_term_logged(tiny):
    out = train(tiny, "moe", {**BLOCK, "method": {"name": "moe-lora", "experts": 3}})
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert logged and all(entry["loss_align/moe_balance"] > 0 for entry in logged)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "MMT_MOELORA"
    tensors = adapter_tensors(out)
    expected = expected_modules(tiny)
    assert {k.removeprefix("base_model.model.").split(".moelora_")[0] for k in tensors} == set().union(*expected.values())
    for module in (*expected["projector"], *expected["vision"]):  # B starts at zero: these trained
        assert tensors[f"base_model.model.{module}.moelora_B"].abs().sum() > 0, module
        assert tensors[f"base_model.model.{module}.moelora_B"].shape[0] == 3


@needs_lf
def test_torchrun_ranks_apply_the_same_setup(tiny):
    """FORCE_TORCHRUN with one CPU process: the rank re-enters through this module and applies the plan.
    (More than one device is untested here: there is no GPU.)"""
    out = train(tiny, "ranks", BLOCK, "max_steps=1", env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})
    record = read_report(out)
    assert sorted(g["name"] for g in record["optimizer_groups"]) == ["language", "projector", "vision"]
    assert adapted_modules(adapter_tensors(out)) == set().union(*expected_modules(tiny).values())


@needs_lf
def test_fsdp2_on_two_cpu_ranks_shards_every_parameter_and_saves_a_plain_adapter(tiny):
    """LLaMA-Factory's own `fsdp` / `fsdp_config` keys under FORCE_TORCHRUN with 2 CPU processes: accelerate would wrap
    DDP there, so mmtuning shards the model (its trainer carries MMTuningTrainerMixin) with a schedule on."""
    block = {**BLOCK, "language": {**BLOCK["language"], "schedule": {"type": "top_down", "start": 1, "every": 1}}}
    out = train(tiny, "fsdp", block, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, fsdp="full_shard",
                fsdp_config={"fsdp_version": 2}, per_device_train_batch_size=1)
    sharding = read_report(out)["sharding"]
    assert sharding["world_size"] == 2 and sharding["sharded_parameters"] == sharding["parameters"] > 0, sharding
    tensors = adapter_tensors(out)
    assert adapted_modules(tensors) == set().union(*expected_modules(tiny).values())
    config = json.loads((tiny / "model" / "config.json").read_text())
    a = tensors["base_model.model.model.multi_modal_projector.linear_1.lora_A.weight"]
    assert tuple(a.shape) == (8, config["vision_config"]["hidden_size"])  # full tensors, not one rank's shard


# keep: prompts over the batch's images plus a dataset of dataset_info.json, written by LLaMA-Factory's template
KEEP = {"prompts": ["what colour is the image ?"], "images": "train", "data": "keep_questions", "target": "kl",
        "weight": 0.5, "ramp": 0, "batch_size": 2, "answer_tokens": 4, "fuse": True}


@needs_lf
def test_keep_run_under_the_template_logs_a_nonzero_keep_term_and_trains(tiny):
    out, done = train_logged(tiny, "keep", {**BLOCK, "keep": KEEP}, "max_steps=3", "per_device_train_batch_size=1",
                             "gradient_accumulation_steps=2")  # a single-GPU user's shape: keep rows per step
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 3 and all("loss_keep" in entry for entry in logged), logged
    # KL to the adapter-off base: 0 while every lora_B is still 0 (up to float rounding: the base's answer is
    # decoded through the key/value cache, the tuned logits come from one full forward), above 0 once they moved
    assert abs(logged[0]["loss_keep"]) < 1e-6 and logged[-1]["loss_keep"] > 1e-4, logged
    tensors = adapter_tensors(out)
    assert adapted_modules(tensors) == set().union(*expected_modules(tiny).values())
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if ".lora_B." in k)
    log = done.stdout + done.stderr  # LLaMA-Factory's logger writes to stdout
    assert "mmtuning keep: 1 prompt(s), 2 conversation(s), images: the training batches' images" in log, log[-3000:]
    # `fuse`: the keep rows rode in LLaMA-Factory's own training forward on every step, none fell back
    assert "in the training forward (fuse)" in log and "a forward of their own" not in log, log[-3000:]
    # LLaMA-Factory's llava template wrote the prompts (its default system prompt, "A chat between a curious user
    # and an artificial intelligence assistant ...", words outside the tiny vocabulary shown as <unk>), not the
    # checkpoint's own chat template (<|im_start|>user ...)
    templates = re.findall(r"mmtuning keep template: '(.*)'", log)
    assert templates and all("user and an" in t and "<|im_start|>" not in t for t in templates), templates
    assert any(": <image> what colour is the image ? <unk> :" in t for t in templates), templates
    assert any(": <image> how many shapes are there ? <unk> :" in t for t in templates), templates
    assert re.search(r"mmtuning keep base answer: '<image> how many shapes are there \?' -> ", log)


@needs_lf
def test_keep_template_matches_llamafactorys_own_encoding(tiny):
    """The render handed to keep gives exactly the ids LLaMA-Factory's template and mm plugin give a training
    prompt (before image tokens are widened), for the run's tokenizer."""
    done = run_lf("-c", KEEP_TEMPLATE_CHECK, str(tiny / "model"), timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report["keep"] == report["llamafactory"] and report["keep"].count(report["image_id"]) == 1, report


KEEP_TEMPLATE_CHECK = """
import json, sys, dataclasses
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from llamafactory.model import load_tokenizer
from llamafactory.hparams import ModelArguments
from mmtuning_plugin.integrations.llamafactory import template_render
from mmtuning_plugin.keep.rows import user_messages
module = load_tokenizer(ModelArguments(model_name_or_path=sys.argv[1]))
tokenizer, processor = module["tokenizer"], module["processor"]
template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="llava"))
text = template_render(template, tokenizer, processor, True)(user_messages("what colour is the image ?", 1))
plugin = dataclasses.replace(template.mm_plugin, expand_mm_tokens=False)
turn = plugin.process_messages([{"role": "user", "content": "<image>what colour is the image ?"},
                                {"role": "assistant", "content": ""}], [None], [], [], processor)
ids, _ = template.encode_oneturn(tokenizer, turn)
print("REPORT" + json.dumps({"keep": tokenizer(text)["input_ids"], "llamafactory": ids,
                             "image_id": tokenizer.convert_tokens_to_ids(template.mm_plugin.image_token)}))
"""


def test_keep_data_names_a_dataset_of_dataset_info_or_is_refused(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "alp": {"file_name": "alp.json", "columns": {"prompt": "instruction", "query": "input", "images": "images"}},
        "hub": {"hf_hub_url": "someone/data"}}))
    (tmp_path / "alp.json").write_text(json.dumps([{"instruction": "<image>what colour?", "input": "one word",
                                                     "output": "", "images": ["pics/a.png"]}]))
    if importlib.util.find_spec("llamafactory") is None:
        with pytest.raises(MMTuningError, match="llamafactory==0.9.5"):
            lf.with_keep_dataset({"keep": {"data": "alp"}}, {"dataset_dir": str(tmp_path)})
    else:
        block = lf.with_keep_dataset({"keep": {"data": "alp"}}, {"dataset_dir": str(tmp_path)})
        row = json.loads(Path(block["keep"]["data"]).read_text())
        assert row == {"messages": [{"role": "user", "content": "<image>what colour?\none word"}],
                       "images": [str(tmp_path / "pics" / "a.png")]}
        with pytest.raises(MMTuningError, match="keep data is read only from a local"):
            lf.with_keep_dataset({"keep": {"data": "hub"}}, {"dataset_dir": str(tmp_path)})
    with pytest.raises(MMTuningError, match=r"'nope' is neither a file nor a dataset of .*\(it lists: alp, hub\)"):
        lf.with_keep_dataset({"keep": {"data": "nope"}}, {"dataset_dir": str(tmp_path)})
    unchanged = {"keep": {"data": str(tmp_path / "alp.json")}}  # a file stays a file
    assert lf.with_keep_dataset(unchanged, {"dataset_dir": str(tmp_path)}) is unchanged


@needs_lf
def test_unknown_llamafactory_key_fails_before_loading_with_exit_2(tiny):
    config = write_config(tiny, "bad", BLOCK, lora_rnk=8)
    done = run_lf("-m", "mmtuning_plugin.cli", "llamafactory", "train", str(config), timeout=180)
    assert done.returncode == 2
    assert "lora_rnk" in done.stderr and "Traceback" not in done.stderr
    assert not (tiny / "bad").exists()


# --- in-process: config, conflicts, launcher ----------------------------------------------------------


def test_block_is_removed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "stage": "sft", "mmtuning": {"vision": True}}))
    job = lf.split_config(lf.read_config(path, ["max_steps=3", "mmtuning.vision.layers=top:2"]))
    assert "mmtuning" not in job.args and job.args["max_steps"] == 3 and job.args["finetuning_type"] == "lora"
    assert job.session.config.vision.enabled and job.session.config.vision.layers.count == 2
    with pytest.raises(MMTuningError, match=r"mmtuning.vision.layer: unknown key"):
        lf.split_config({"mmtuning": {"vision": {"layer": "all"}}})


@pytest.mark.parametrize("key, value, hint", [
    ("freeze_vision_tower", False, "mmtuning.vision"),
    ("loraplus_lr_ratio", 16.0, "per-modality parameter groups"),
    ("adapter_name_or_path", "out/old", "resume_from_checkpoint"),
])
def test_conflicting_llamafactory_keys_are_refused_with_the_replacement(key, value, hint):
    with pytest.raises(MMTuningError) as error:
        lf.split_config({"model_name_or_path": "m", key: value, "mmtuning": {}})
    assert f"`{key}`" in str(error.value) and hint in str(error.value)


def test_host_lora_keys_are_the_blocks_defaults_and_only_contradictions_are_refused_in_one_message():
    job = lf.split_config({"model_name_or_path": "m", "lora_rank": 32, "lora_alpha": 16, "lora_dropout": 0.05,
                           "lora_target": "all", "mmtuning": {"vision": {"r": 8}}})
    config = job.session.config
    assert (config.r, config.alpha, config.dropout, config.scale_alpha("vision")) == (32, 16, 0.05, 4)
    assert "lora_target" not in job.args and job.replaced_targets == ["lora_target: all"]
    with pytest.raises(MMTuningError) as error:
        lf.split_config({"lora_rank": 32, "lora_alpha": 16, "mmtuning": {"r": 8, "alpha": 16, "dropout": 0.1}})
    message = str(error.value)
    assert "`lora_rank: 32` vs `mmtuning.r: 8`" in message and "lora_alpha" not in message  # alpha agrees
    assert "`lora_dropout" not in message  # the YAML sets no lora_dropout: nothing contradicts mmtuning.dropout


def test_kbit_preparation_settings_llamafactory_would_drop_are_refused():
    with pytest.raises(MMTuningError) as error:
        lf.split_config({"mmtuning": {"quant": {"preset": "balanced", "checkpoint_vision": True, "fp32_norms": True}}})
    message = str(error.value)
    assert "`mmtuning.quant.checkpoint_vision` (never applied in LLaMA-Factory" in message
    assert "`mmtuning.quant.fp32_norms`" in message and "upcast_layernorm" in message
    lf.split_config({"quantization_bit": 4, "mmtuning": {"quant": "balanced"}})  # the preset alone sets none of them


def test_a_quant_policy_the_loading_does_not_match_is_refused_before_loading():
    """`quant:` shapes the quantization LLaMA-Factory performs: a policy that quantizes needs `quantization_bit`
    of its precision, a 16-bit policy none, and only bitsandbytes has a skip list (all in one message)."""
    with pytest.raises(MMTuningError) as error:
        lf.split_config({"quantization_method": "hqq", "mmtuning": {"quant": "balanced"}})
    message = str(error.value)
    assert "`mmtuning.quant: balanced` (vision nf4, language nf4) needs a 4-bit model, but LLaMA-Factory loads this " \
           "one in 16-bit (add `quantization_bit: 4`" in message
    assert "`quantization_method: hqq`" in message
    with pytest.raises(MMTuningError, match="`quantization_bit: 8` vs `mmtuning.quant: balanced`"):
        lf.split_config({"quantization_bit": 8, "mmtuning": {"quant": "balanced"}})
    with pytest.raises(MMTuningError, match="the policy keeps every modality 16-bit"):
        lf.split_config({"quantization_bit": 4, "mmtuning": {"quant": "none"}})
    lf.split_config({"mmtuning": {"quant": "none"}})


def test_unsupported_stage_and_finetuning_type_are_refused():
    with pytest.raises(MMTuningError, match="stage: dpo"):
        lf.split_config({"stage": "dpo", "mmtuning": {}})
    with pytest.raises(MMTuningError, match="finetuning_type: full"):
        lf.split_config({"finetuning_type": "full", "mmtuning": {}})
    with pytest.raises(MMTuningError, match="no `mmtuning:` block"):
        lf.split_config({"stage": "sft"})
    with pytest.raises(MMTuningError, match="mmtuning.keep needs stage: sft"):
        lf.split_config({"stage": "pt", "mmtuning": {"keep": {"prompts": ["what shape is it?"]}}})
    with pytest.raises(MMTuningError, match="init: corda reads the run's first training batches"):
        lf.split_config({"stage": "pt", "mmtuning": {"init": "corda"}})
    with pytest.raises(MMTuningError, match="fsdp_version 1 on CPU processes"):
        lf.split_config({"fsdp": "full_shard", "use_cpu": True, "mmtuning": {}})
    with pytest.raises(MMTuningError, match="quant_storage: uint8 under fsdp"):
        lf.split_config({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}, "quantization_bit": 4,
                         "mmtuning": {"quant": {"preset": "balanced", "quant_storage": "uint8"}}})


def test_torchrun_launch_rule_and_command():
    assert not lf.wants_torchrun({}, 1) and lf.wants_torchrun({}, 2) and lf.wants_torchrun({"FORCE_TORCHRUN": "1"}, 0)
    assert not lf.wants_torchrun({"LOCAL_RANK": "0"}, 8)  # a rank never re-launches
    assert not lf.wants_torchrun({"USE_RAY": "1"}, 4)
    command = lf.torchrun_command(Path("cfg.yaml"), ["max_steps=5"], {"NNODES": "2", "NODE_RANK": "1"}, 4,
                                  python="/venv/bin/python", port=29511)
    assert command[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    flags = dict(zip(command[3:13:2], command[4:13:2]))
    assert flags == {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "4", "--master_addr": "127.0.0.1",
                     "--master_port": "29511"}
    assert command[13:] == ["-m", "mmtuning_plugin.integrations.llamafactory", str(Path("cfg.yaml").absolute()),
                            "max_steps=5"]


def test_cli_without_llamafactory_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    if importlib.util.find_spec("llamafactory") is not None:
        pytest.skip("llamafactory is installed in this environment")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "mmtuning": {}}))
    result = CliRunner().invoke(app, ["llamafactory", "train", str(path)])
    assert result.exit_code == 2 and "llamafactory==0.9.5" in result.output
    assert "llamafactory" not in sys.modules


# --- recipes ------------------------------------------------------------------------------------------

RECIPES = ROOT / "recipes" / "llamafactory"
RECIPE_MODEL_TYPES = {
    "qwen2_5_vl_7b_qlora.yaml": "qwen2_5_vl",
    "qwen2_5_vl_72b_fsdp2_qlora.yaml": "qwen2_5_vl",
    "qwen3_vl_8b_qlora.yaml": "qwen3_vl",
    "llava_1_5_7b_qlora.yaml": "llava",
    "llama_3_2_11b_vision_qlora.yaml": "mllama",
    "gemma_3_4b_qlora.yaml": "gemma3",
}
# Parses each recipe with LLaMA-Factory's own parser (offline, no weights). bf16 is a hardware check the CPU
# host fails, so it is swapped for use_cpu; output_dir goes to a temporary folder.
CHECK_RECIPES = """
import json, sys
from pathlib import Path
from llamafactory.data.template import TEMPLATES
from llamafactory.extras.constants import DEFAULT_TEMPLATE, SUPPORTED_MODELS, DownloadSource
from mmtuning_plugin.integrations import llamafactory as lf
report = {}
for path in sys.argv[2:]:
    job = lf.split_config(lf.read_config(Path(path), ["bf16=false", "use_cpu=true", "output_dir=" + sys.argv[1]]))
    model_args, data_args, training_args, finetuning_args, _ = lf.check_host_args(job.args)
    names = [name for name, sources in SUPPORTED_MODELS.items()
             if sources.get(DownloadSource.DEFAULT) == model_args.model_name_or_path]
    report[Path(path).name] = {"template": data_args.template, "known_template": data_args.template in TEMPLATES,
                               "registry_templates": sorted({DEFAULT_TEMPLATE.get(n) for n in names}),
                               "quantization_bit": model_args.quantization_bit, "stage": finetuning_args.stage}
print("REPORT" + json.dumps(report))
"""


def test_recipes_cover_the_models_and_plan_on_each_architecture():
    from mmtuning_plugin.loading import load_skeleton
    from mmtuning_plugin.targets import plan_targets

    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(RECIPE_MODEL_TYPES)
    for name, model_type in RECIPE_MODEL_TYPES.items():
        job = lf.split_config(lf.read_config(RECIPES / name, []), where=name)
        plan = plan_targets(load_skeleton(model_type), job.session.config)
        assert plan.modules_of("vision") and (plan.modules_of("projector") or plan.parameters_of("projector")), name


@needs_lf
def test_recipes_pass_llamafactorys_own_parser_with_its_documented_templates(tmp_path):
    done = run_lf("-c", CHECK_RECIPES, str(tmp_path / "out"), *map(str, sorted(RECIPES.glob("*.yaml"))), timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert sorted(report) == sorted(RECIPE_MODEL_TYPES)
    for name, row in report.items():
        assert row["known_template"] and row["registry_templates"] == [row["template"]], (name, row)
        assert row["quantization_bit"] == 4 and row["stage"] == "sft", (name, row)


def test_plan_errors_surface_from_the_config_before_weights_load(tmp_path):
    from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

    save_tiny_checkpoint("llava", tmp_path / "model")
    job = lf.split_config({"model_name_or_path": str(tmp_path / "model"), "mmtuning": {"vision": {"layers": {"top": 9}}}})
    with pytest.raises(MMTuningError, match=r"mmtuning.vision.layers: asks for top 9 layers but there are only 3 \(0-2 usable"):
        lf.plan_ahead(job)
    lf.plan_ahead(lf.split_config({"model_name_or_path": str(tmp_path / "missing"), "mmtuning": {}}))  # not on disk: later


# Selective tuning (docs/selective.md) through LLaMA-Factory: LayerNorm tuning on the last vision layer LLaVA
# reads, the projector whole, the top language layer with SPIDER's masked updates.
SELECTIVE_BLOCK = {"vision": {"layers": [-1], "selective": "layernorm"}, "projector": {"selective": "full"},
                   "language": {"layers": {"top": 1}, "selective": {"method": "spider", "mask_ratio": 0.5}}}


@needs_lf
def test_selective_run_saves_exactly_the_planned_weights_with_one_group_per_modality(tiny):
    from transformers import AutoModelForImageTextToText

    out = train(tiny, "selective", SELECTIVE_BLOCK)
    config = json.loads((tiny / "model" / "config.json").read_text())
    vision = f"model.vision_tower.encoder.layers.{config['vision_config']['num_hidden_layers'] - 2}."
    top = f"model.language_model.layers.{config['text_config']['num_hidden_layers'] - 1}."
    expected = {vision + f"{norm}.{t}" for norm in ("layer_norm1", "layer_norm2") for t in ("weight", "bias")}
    expected |= {f"model.multi_modal_projector.linear_{i}.{t}" for i in (1, 2) for t in ("weight", "bias")}
    expected |= {top + f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                               "input_layernorm", "post_attention_layernorm")}
    tensors = {k.removeprefix("base_model.model."): v for k, v in adapter_tensors(out).items()}
    assert set(tensors) == expected
    base = AutoModelForImageTextToText.from_pretrained(tiny / "model").state_dict()  # the checkpoint's layout is older
    assert not tensors["model.multi_modal_projector.linear_1.weight"].equal(base["model.multi_modal_projector.linear_1.weight"])
    moved = (tensors[top + "self_attn.q_proj.weight"] != base[top + "self_attn.q_proj.weight"]).float().mean()
    assert 0 < moved < 1  # SPIDER moved only the weights whose task importance exceeds their magnitude
    record = read_report(out)
    groups = {g["name"]: g["tensors"] for g in record["optimizer_groups"]}
    assert groups == {"vision": 4, "projector": 4, "language": 9}
