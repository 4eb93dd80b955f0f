"""`mmtune demo`: held-out synthetic data, the shipped pre-trained model, and metrics from real predictions."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmtuning_plugin.cli import app
from mmtuning_plugin.demo.data import TASKS, answers_of, is_held_out, make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode
from mmtuning_plugin.demo.pretrain import METADATA, pretrain
from mmtuning_plugin.demo.runner import (RESULTS, DemoSettings, EvalSets, evaluate_adapter, load_base,
                                         load_processor, load_recipes, run_demo, scores)
from mmtuning_plugin.session import MMTuning

runner = CliRunner()


def test_eval_items_are_never_training_items():
    train = make_set("general", "train", 3000) + make_set("target", "train", 3000)
    held_out = make_set("general", "eval", 300) + make_set("target", "eval", 300)
    seen = {(item.key, item.question) for item in train}
    assert not any((item.key, item.question) in seen for item in held_out)
    assert all(is_held_out(item.key, item.question) for item in held_out)
    assert not any(is_held_out(item.key, item.question) for item in train)


def test_items_are_deterministic_and_answers_match_the_picture():
    first, again = make_set("target", "eval", 20, seed=3), make_set("target", "eval", 20, seed=3)
    assert [(i.key, i.answer) for i in first] == [(i.key, i.answer) for i in again]
    assert list(first[0].image.getdata()) == list(again[0].image.getdata())
    for item in first:
        colour, shape, position, *_ = item.key
        assert item.answer == position and item.question == TASKS["target"][0][0]
    assert answers_of("target") == ["bottom", "center", "left", "right", "top"]


def test_scores_are_the_surveys_e_f_o():
    result = scores({"target": 0.1, "general": 0.9}, {"target": 0.8, "general": 0.75})
    assert result == pytest.approx({"E": 70.0, "F": -15.0, "O": 55.0})


def test_shipped_model_knows_the_general_set_and_not_the_target_task():
    """The embedded checkpoint is the one pretrain.json describes: its general accuracy, re-measured."""
    metadata = json.loads((MODEL_DIR / METADATA).read_text())
    processor = load_processor(MODEL_DIR)
    model = load_base(MODEL_DIR, MMTuning({}), four_bit=False)
    sets = EvalSets(target=_encode(processor, "target", 64),
                    general=_encode(processor, "general", metadata["recipe"]["eval_items"]))
    accuracies = sets.measure(model, processor.tokenizer)
    # the weights are the shipped ones, but greedy decoding on another CPU can flip a near-tie: a small band
    assert accuracies["general"] == pytest.approx(metadata["general_accuracy"], abs=0.03)
    assert accuracies["general"] >= 0.7
    assert accuracies["target"] <= 0.05  # it never saw a position question


def _encode(processor, task, count):
    from mmtuning_plugin.demo.model import encode

    return encode(processor, make_set(task, "eval", count, seed=0))


# Float rounding differs between CPUs (AVX2 vs AVX-512 kernels, other reduction orders), and training
# amplifies it: the first trace point (step 100, mid-learning) read 0.4023 on the machine that recorded it
# and 0.3945 on an AMD EPYC. Bits are compared only between two runs on one machine; the recorded trace
# only within this band, wide enough for any CPU and far narrower than the 0.4 -> 0.97 climb it checks.
CROSS_MACHINE_ACCURACY = 0.1


def test_pretrain_script_is_deterministic_and_tracks_the_shipped_checkpoint():
    """Re-run the first trace interval of the shipped recipe twice: identical bits within this machine, and
    the recorded accuracy of the shipped checkpoint's run within the cross-machine band."""
    metadata = json.loads((MODEL_DIR / METADATA).read_text())
    first = int(metadata["recipe"]["trace_every"])
    model, _, rerun = pretrain(stop_after=first, log=lambda *_: None)
    again, _, rerun_again = pretrain(stop_after=first, log=lambda *_: None)
    assert rerun["trace"] == rerun_again["trace"]
    weights, weights_again = model.state_dict(), again.state_dict()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert rerun["trace"][str(first)] == pytest.approx(metadata["trace"][str(first)], abs=CROSS_MACHINE_ACCURACY)


def test_recipes_are_valid_mmtuning_blocks_that_differ():
    recipes = load_recipes()
    assert set(recipes) == {"plain_lora", "mmtuning"}
    plans = {name: MMTuning(r["mmtuning"]).config for name, r in recipes.items()}
    assert plans["plain_lora"] != plans["mmtuning"]


def test_demo_refuses_an_out_dir_with_user_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["demo", "--steps", "1", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 2
    assert "not an earlier demo's output" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = runner.invoke(app, ["demo", "--steps", "40", "--seed", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_demo_reports_e_f_o_from_before_and_after_accuracies(short_demo):
    out, report = short_demo
    assert report["seed"] == 1 and set(report["arms"]) == {"plain_lora", "mmtuning"}
    assert json.loads((out / RESULTS).read_text())["arms"].keys() == report["arms"].keys()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in report["arms"].values():
        assert arm["E"] == pytest.approx(100 * (arm["after"]["target"] - arm["before"]["target"]))
        assert arm["F"] == pytest.approx(100 * (arm["after"]["general"] - arm["before"]["general"]))
        assert arm["O"] == pytest.approx(arm["E"] + arm["F"])
        assert arm["curve"][0]["step"] == 0 and arm["curve"][-1]["step"] == 40
        assert arm["after"]["target"] > arm["before"]["target"]  # 40 steps already teach positions
    assert report["arms"]["plain_lora"]["trainable_params"] > report["arms"]["mmtuning"]["trainable_params"]


def test_demo_reports_which_skills_were_kept_and_what_keep_showed(short_demo):
    """Accuracy per question type before/after (general = colour + shape, target = position), and the mmtuning
    arm's keep report: the base's own answers to the keep prompts, shown before training."""
    out, report = short_demo
    for arm in report["arms"].values():
        for phase in ("before", "after"):
            by_question = arm[phase]["by_question"]
            assert set(by_question) == {"position", "colour", "shape"}
            assert all(0 <= v <= 1 for v in by_question.values())
        assert arm["before"]["by_question"]["position"] <= 0.05  # the base never learnt positions
    keep = report["arms"]["mmtuning"]["keep"]
    assert keep["target"] == "kl" and keep["prompts"] == 2 and keep["templates"]
    answers = {e["base_answer"] for e in keep["examples"]}
    assert answers and answers <= set(answers_of("general"))  # the base answers colour/shape questions in kind
    assert report["arms"]["plain_lora"]["keep"] == {}


def test_demo_accuracy_comes_from_the_saved_adapter_and_a_corrupted_one_scores_lower(short_demo, tmp_path):
    out, report = short_demo
    arm = report["arms"]["plain_lora"]
    adapter = out / "plain_lora" / "adapter"
    items = report["settings"]["eval_items"]
    measured = evaluate_adapter(adapter, items=items)
    assert {k: measured[k] for k in ("target", "general")} == pytest.approx({k: arm["after"][k] for k in ("target", "general")})
    assert measured["by_question"] == pytest.approx(arm["after"]["by_question"])

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights = {k: (v + 0.5 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, str(broken / "adapter_model.safetensors"))
    assert evaluate_adapter(broken, items=items)["target"] < arm["after"]["target"]


@pytest.mark.parametrize("task", ["target", "general"])
def test_encoding_each_distinct_picture_once_matches_the_processor_on_every_item(task):
    processor = load_processor(MODEL_DIR)
    items = make_set(task, "train", 120, seed=3)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": i.question}]}],
                                           add_generation_prompt=True, tokenize=False) for i in items]
    batch = processor(text=texts, images=[i.image for i in items], return_tensors="pt", padding=True)
    encoded = encode(processor, items)
    assert len({i.key for i in items}) < len(items)  # pictures repeat, so the shortcut is exercised
    for row, (item, enc) in enumerate(zip(items, encoded)):
        assert enc.prompt_ids == batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert torch.equal(enc.pixel_values, batch["pixel_values"][row])
        assert processor.tokenizer.decode(enc.answer_ids, skip_special_tokens=True).strip() == item.answer == enc.answer


def test_arms_trained_in_parallel_processes_match_the_sequential_run(tmp_path):
    """`--jobs 2` trains each arm in its own spawned process: the numbers and adapters must be those of the
    one-process run (each process rebuilds the data and seeds itself the same way)."""
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        report = run_demo(DemoSettings(steps=6, seed=2, eval_items=16, curve_points=2, jobs=jobs, out=out))
        arms = {name: {k: arm[k] for k in ("before", "after", "curve", "loss", "keep", "trainable_params")}
                for name, arm in report["arms"].items()}
        adapters = {name: load_file(str(out / name / "adapter" / "adapter_model.safetensors")) for name in arms}
        runs[jobs] = arms, adapters
    (sequential, sequential_weights), (parallel, parallel_weights) = runs[1], runs[2]
    assert set(sequential) == {"plain_lora", "mmtuning"} and all(arm["loss"] for arm in sequential.values())
    assert parallel == sequential
    for name, weights in sequential_weights.items():
        assert weights.keys() == parallel_weights[name].keys()
        assert all(torch.equal(weights[k], parallel_weights[name][k]) for k in weights), name


def test_demo_intro_prints_the_seed_and_each_arms_target_plan():
    from rich.console import Console

    from mmtuning_plugin.demo.report import DemoConsole
    from mmtuning_plugin.demo.runner import DemoSettings

    console = Console(record=True, width=100)
    DemoConsole(console, DemoSettings(seed=7)).intro()
    text = console.export_text()
    assert "seed 7" in text
    assert "plain LoRA" in text and "mmtuning (llava" in text
    # the recipe's vision adapters sit on the top two of the three layers LLaVA reads (layer 3 feeds nothing)
    assert "1-2 of 4" in text
