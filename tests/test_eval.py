"""`mmtune eval`: E/F/O for any adapter on the user's own JSONL sets, and its refusals of bad input."""

import json

import pytest
from typer.testing import CliRunner

from mmtuning_plugin.cli import app
from mmtuning_plugin.demo.data import TASKS, make_set
from mmtuning_plugin.demo.model import MODEL_DIR
from mmtuning_plugin.demo.runner import load_base
from mmtuning_plugin.scoring import accuracy_by_kind, matches, normalise
from mmtuning_plugin.session import MMTuning
from helpers import perturb_lora_b

runner = CliRunner()


def write_set(folder, task, count):
    folder.mkdir(exist_ok=True)
    kinds = {q: a for q, a in TASKS[task]}
    lines = []
    for index, item in enumerate(make_set(task, "eval", count)):
        item.image.save(folder / f"{task}{index}.png")
        lines.append(json.dumps({"image": f"{task}{index}.png", "question": item.question, "answer": item.answer,
                                 "type": kinds[item.question]}))
    path = folder / f"{task}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    session = MMTuning({"language": {"modules": "attention"}})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=False))
    model.save_pretrained(str(root / "untouched"))
    perturb_lora_b(model, std=0.5)
    model.save_pretrained(str(root / "perturbed"))
    data = root / "data"
    return root, write_set(data, "target", 8), write_set(data, "general", 12)


def evaluate(adapter, target, general, *extra):
    result = runner.invoke(app, ["eval", str(adapter), "--target", str(target), "--general", str(general), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_untouched_adapter_changes_nothing_and_the_base_knows_the_general_set(files):
    root, target, general = files
    report = evaluate(root / "untouched", target, general)
    assert report["base"] == str(MODEL_DIR)
    for row in report["sets"].values():
        assert row["before_answers"] == row["after_answers"]  # LoRA B starts at 0: the adapter is the base
    assert report["E"] == report["F"] == report["O"] == 0
    assert report["sets"]["general"]["before"] >= 0.7 and report["sets"]["target"]["before"] <= 0.2
    assert set(report["sets"]["general"]["before_by_type"]) <= {"colour", "shape"}


def test_a_changed_adapter_is_scored_against_the_same_base(files):
    root, target, general = files
    report = evaluate(root / "perturbed", target, general, "--match", "exact")
    untouched = evaluate(root / "untouched", target, general, "--match", "exact")
    assert report["sets"]["general"]["before_answers"] == untouched["sets"]["general"]["before_answers"]
    assert report["sets"]["general"]["after_answers"] != report["sets"]["general"]["before_answers"]
    assert report["F"] == pytest.approx(100 * (report["sets"]["general"]["after"] - report["sets"]["general"]["before"]))


def test_table_output(files):
    root, target, general = files
    result = runner.invoke(app, ["eval", str(root / "untouched"), "--target", str(target), "--general", str(general)])
    assert result.exit_code == 0, result.output
    assert "before %" in result.output and "colour" in result.output and "E +0.0" in result.output


@pytest.mark.parametrize("line, fix", [
    ("{oops", "not JSON"),
    ('{"image": "x.png", "question": "q"}', "missing answer"),
    ('{"image": "nowhere.png", "question": "q", "answer": "a"}', "does not exist"),
])
def test_bad_input_is_exit_2_with_one_paragraph(files, tmp_path, line, fix):
    root, target, general = files
    bad = target.parent / f"bad-{tmp_path.name}.jsonl"  # beside the images its good lines name
    bad.write_text(target.read_text() + line + "\n")
    result = runner.invoke(app, ["eval", str(root / "untouched"), "--target", str(bad), "--general", str(general)])
    assert result.exit_code == 2 and fix in result.output and "line 9" in result.output
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["eval", str(root / "untouched"), "--target", str(tmp_path / "no.jsonl"),
                                  "--general", str(general)])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_an_adapter_from_a_relatively_loaded_base_is_scored_from_any_directory(files, tmp_path, monkeypatch):
    """The base loaded as `./model` is recorded with its absolute path, so eval needs no --base elsewhere; a wrong
    --base is named as --base, not blamed on the adapter."""
    import shutil

    root, target, general = files
    shutil.copytree(MODEL_DIR, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    session = MMTuning({"language": {"modules": "attention"}})
    model = session.wrap(load_base("model", session, four_bit=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = evaluate(tmp_path / "adapter", target, general)
    assert report["base"] == str(tmp_path / "model") and report["E"] == 0
    wrong = runner.invoke(app, ["eval", str(tmp_path / "adapter"), "--target", str(target), "--general", str(general),
                                "--base", "no-such-model"])
    assert wrong.exit_code == 2 and "--base no-such-model: not a model directory" in wrong.output


def test_matching_rules():
    assert normalise("The Circle.") == "circle" and matches("The circle.", "circle", "normalised")
    assert not matches("The circle.", "circle", "exact") and matches(" circle ", "circle", "exact")
    assert accuracy_by_kind(["red", "x", "circle"], ["red", "blue", "circle"], ["colour", "colour", "shape"]) == \
        {"colour": 0.5, "shape": 1.0}
