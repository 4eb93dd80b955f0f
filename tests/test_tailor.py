"""`mmtune convert tailor`: the salient share of a LoRA adapter's delta per modality, written exactly as a sparse
PEFT adapter that loads, scores with `mmtune eval`, and refuses what it cannot hold."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import perturb_lora_b
from mmtuning_plugin.cli import app
from mmtuning_plugin.convert.adapter import read_adapter
from mmtuning_plugin.demo.model import MODEL_DIR
from mmtuning_plugin.demo.runner import load_base
from mmtuning_plugin.methods import register_peft_methods
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import tiny_batch

runner = CliRunner()


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA adapter of the demo model on all three modalities, its B factors moved off zero."""
    root = tmp_path_factory.mktemp("tailor")
    session = MMTuning({"vision": {"layers": {"top": 1}}, "language": {"modules": "attention"}})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=False))
    perturb_lora_b(model, std=0.5)
    model.save_pretrained(str(root / "lora"))
    model.eval()
    batch = tiny_batch(model.get_base_model()).inputs
    with torch.no_grad():
        logits = model(**batch).logits
    return root, batch, logits


def tailored(root, name, *options):
    result = runner.invoke(app, ["convert", "tailor", str(root / "lora"), "--out", str(root / name), "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def load(path):
    from peft import PeftModel

    register_peft_methods()
    return PeftModel.from_pretrained(load_base(MODEL_DIR, MMTuning({}), False), str(path)).eval()


def test_keeping_everything_reproduces_the_lora_and_a_share_keeps_the_largest_entries(lora):
    root, batch, logits = lora
    whole = tailored(root, "whole", "--keep", "1")
    assert whole["total_relative_error"] == 0
    with torch.no_grad():
        assert torch.allclose(load(root / "whole")(**batch).logits, logits, atol=1e-4)

    summary = tailored(root, "tenth", "--keep", "0.1", "--per-modality", "vision=0.05")
    assert summary["modalities"]["vision"]["share"] == 0.05 and summary["modalities"]["language"]["share"] == 0.1
    tensors = load_file(str(root / "tenth" / "adapter_model.safetensors"))
    factors = read_adapter(root / "lora").modules
    for row in summary["modules"]:
        delta = factors[row["module"]].delta()
        values = tensors[f"base_model.model.{row['module']}.sparse_values"]
        rows, columns = tensors[f"base_model.model.{row['module']}.sparse_indices"]
        assert values.numel() == row["kept"] == math.ceil(row["share"] * delta.numel())
        assert torch.equal(delta[rows, columns], values)  # the delta's own entries, unchanged
        assert values.abs().min() >= torch.kthvalue(delta.abs().flatten(), delta.numel() - values.numel() + 1).values
    tailored_model = load(root / "tenth")
    with torch.no_grad():
        out = tailored_model(**batch).logits
    assert not torch.allclose(out, logits)
    changed = sum(int((p != 0).sum()) for n, p in tailored_model.named_parameters() if "sparse_values" in n)
    assert changed == sum(row["kept"] for row in summary["modules"])


def test_mmtune_eval_scores_a_tailored_adapter(lora, tmp_path):
    from test_eval import write_set

    root, _, _ = lora
    tailored(root, "for-eval", "--keep", "0.2")
    target, general = write_set(tmp_path, "target", 4), write_set(tmp_path, "general", 4)
    result = runner.invoke(app, ["eval", str(root / "for-eval"), "--target", str(target), "--general", str(general),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert {"E", "F", "O"} <= set(json.loads(result.stdout))


@pytest.mark.parametrize("options, words", [
    ([], ["needs --keep"]),
    (["--keep", "0"], ["--keep 0.0", "(0, 1]"]),
    (["--keep", "1.5"], ["--keep 1.5"]),
    (["--per-modality", "vision=2"], ["vision=2", "MODALITY=SHARE"]),
    (["--per-modality", "audio=0.1"], ["audio=0.1"]),
])
def test_bad_options_are_refused_before_writing(lora, options, words):
    root, _, _ = lora
    result = runner.invoke(app, ["convert", "tailor", str(root / "lora"), "--out", str(root / "bad"), *options])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert all(word in text for word in words), text
    assert not (root / "bad").exists()


def test_an_existing_output_and_other_methods_are_refused(lora, tmp_path):
    root, _, _ = lora
    tailored(root, "once", "--keep", "0.5")
    again = runner.invoke(app, ["convert", "tailor", str(root / "lora"), "--out", str(root / "once"), "--keep", "0.1"])
    assert again.exit_code == 2 and "--force" in again.output
    session = MMTuning({"method": "adapter", "language": {"modules": "attention"}})
    session.wrap(load_base(MODEL_DIR, session, four_bit=False)).save_pretrained(str(tmp_path / "bottleneck"))
    other = runner.invoke(app, ["convert", "tailor", str(tmp_path / "bottleneck"), "--out", str(tmp_path / "o"),
                                "--keep", "0.1"])
    assert other.exit_code == 2 and "method: adapter" in " ".join(other.output.split())


def test_calibrated_salience_and_compensation_bring_the_outputs_closer(lora, tmp_path):
    from test_eval import write_set

    root, _, _ = lora
    calib = write_set(tmp_path, "target", 6)
    plain = tailored(root, "plain", "--keep", "0.1", "--calib", str(calib), "--by", "magnitude")
    active = tailored(root, "active", "--keep", "0.1", "--calib", str(calib))
    fitted = tailored(root, "fitted", "--keep", "0.1", "--calib", str(calib), "--compensate")
    assert active["by"] == "activation" and fitted["compensated"] and plain["by"] == "magnitude"
    # on the calibration inputs each step is closer to the full delta's outputs than the one before
    assert fitted["total_output_relative_error"] < active["total_output_relative_error"] \
        < plain["total_output_relative_error"]
    assert [r["kept"] for r in fitted["modules"]] == [r["kept"] for r in active["modules"]]
    with torch.no_grad():  # the compensated adapter loads and runs like any other
        assert torch.isfinite(load(root / "fitted")(**tiny_batch(load(root / "fitted").get_base_model()).inputs).logits).all()


def test_calibrated_options_need_calib_data(lora):
    root, _, _ = lora
    for options in (["--by", "activation"], ["--compensate"], ["--by", "fisher"], ["--by", "hessian", "--calib", "x.jsonl"]):
        result = runner.invoke(app, ["convert", "tailor", str(root / "lora"), "--out", str(root / "x"), "--keep", "0.1",
                                     *options])
        assert result.exit_code == 2, result.output
        assert ("--calib DATA.jsonl" in result.output) or ("magnitude, activation, fisher" in result.output), result.output


def test_fisher_salience_keeps_the_entries_the_answer_loss_is_most_curved_in(lora, tmp_path):
    """--by fisher scores delta^2 x E[(dL/dW)^2] on the calibration answers: its choice differs from activation's,
    and the Fisher it uses equals the base weight's own per-item squared gradient on one module."""
    from test_eval import write_set

    from mmtuning_plugin.convert.tailor import input_moments, salient

    root, _, _ = lora
    calib = write_set(tmp_path, "target", 3)
    fisher = tailored(root, "fisher", "--keep", "0.1", "--calib", str(calib), "--by", "fisher")
    active = tailored(root, "active_f", "--keep", "0.1", "--calib", str(calib))
    assert fisher["by"] == "fisher" and [r["kept"] for r in fisher["modules"]] == [r["kept"] for r in active["modules"]]
    fisher_sets = {k: t for k, t in load_file(str(root / "fisher" / "adapter_model.safetensors")).items() if "indices" in k}
    active_sets = load_file(str(root / "active_f" / "adapter_model.safetensors"))
    assert any(not torch.equal(t, active_sets[k]) for k, t in fisher_sets.items())  # another salience, other entries
    _, fishers = input_moments(root / "lora", None, calib, fisher=True)
    assert set(fishers) == {r["module"] for r in fisher["modules"]} and all(f.min() >= 0 for f in fishers.values())
    module = fisher["modules"][0]["module"]
    delta = read_adapter(root / "lora").modules[module].delta()
    indices, _ = salient(delta, 0.1, fishers[module])
    assert torch.equal(indices, fisher_sets[f"base_model.model.{module}.sparse_indices"])
    assert torch.allclose(fishers[module], base_weight_fisher(root / "lora", calib, module), rtol=1e-3, atol=1e-12)


def base_weight_fisher(adapter, calib, module):
    """The same Fisher another way: the base weight's own .grad per item (same merged-weight gradient), squared."""
    from mmtuning_plugin.evaluate import item_batches, load_adapter_model, read_items

    model, processor, _ = load_adapter_model(adapter, None, four_bit=False)
    weight = model.get_submodule("base_model.model." + module).get_base_layer().weight
    weight.requires_grad_(True)
    model.eval()
    items = read_items(calib, "calib")
    total = torch.zeros_like(weight)
    for batch in item_batches(items, processor, batch_size=1):
        model(**batch).loss.backward()
        total += weight.grad.float().pow(2)
        weight.grad = None
    return total / len(items)
