"""`layers: auto`: the gradient probe picks layers on the first training batches, before wrapping."""

import pytest
import torch
from transformers import TrainingArguments

from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.probe import plan_with_probe, probe_layers
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

AUTO = {"vision": {"layers": {"auto": {"top_k": 1}}}, "language": {"layers": {"auto": {"top_k": 2}}}}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llava")
    return model, tiny_batch(model, batch=2).inputs


def second_batch(inputs):
    """Different answers to learn on the same prompts: labels shifted through the vocabulary."""
    labels = inputs["labels"].clone()
    labels[labels != -100] = (labels[labels != -100] * 7 + 3) % 250 + 5
    return {**inputs, "labels": labels}


def test_same_seed_and_data_give_the_same_layers_and_scores(tiny):
    model, inputs = tiny
    batches = [inputs, second_batch(inputs)]
    first = probe_layers(model, AUTO, batches, seed=3)
    again = probe_layers(model, AUTO, batches, seed=3)
    assert first.summary() == again.summary()
    assert first.batches == 2 and first.tokens > 0
    assert len(first.chosen["vision"]) == 1 and len(first.chosen["language"]) == 2
    language = first.modalities["language"].layers
    assert [s.layer for s in language] == [0, 1, 2, 3]
    assert sum(s.task for s in language) == pytest.approx(1) and sum(s.general for s in language) == pytest.approx(1)
    best = sorted(language, key=lambda s: (-s.score, -s.layer))[:2]
    assert {s.layer for s in best} == set(first.chosen["language"])
    # the answers decide: other labels on the same prompts move the scores
    other = probe_layers(model, AUTO, [second_batch(inputs)], seed=3)
    assert [s.task for s in other.modalities["language"].layers] != [s.task for s in language]


def test_the_probe_leaves_no_gradient_and_no_requires_grad_change(tiny):
    model, inputs = tiny
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" not in name)  # a host may have frozen parts already
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    try:
        probe_layers(model, AUTO, [inputs])
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        assert all(p.grad is None for p in model.parameters())
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


def test_gradient_checkpointing_is_paused_for_the_probe_and_restored():
    """Hosts enable checkpointing before wrapping; its recomputed forwards would hide the probe's scales."""
    model = tiny_model("llava")
    inputs = tiny_batch(model, batch=2).inputs
    plain = probe_layers(model, AUTO, [inputs]).summary()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert flags
    assert probe_layers(model, AUTO, [inputs]).summary() == plain
    assert all(m.gradient_checkpointing is True for m in flags)


def test_a_budget_takes_the_best_layers_that_fit_and_goes_into_the_plan(tiny):
    model, inputs = tiny
    # one language layer's LoRA (r 16, all-linear) is 16,384 parameters in this tiny model: 40k fits two
    plan = plan_with_probe(model, {"language": {"layers": {"auto": {"budget": "40k"}}}}, [inputs])
    probe = plan.probe.modalities["language"]
    assert all(s.params == 16384 for s in probe.layers)
    assert plan.layers["language"] == probe.chosen and len(probe.chosen) == 2
    assert plan.trainable_params("language") == 2 * 16384
    summary = plan.summary()["probe"]
    assert summary["modalities"]["language"]["chosen"] == plan.layers["language"]
    assert summary["general"].startswith("the base model's own")


@pytest.mark.parametrize("layers, message", [
    ({"auto": {"budget": 1000}}, ["select no layer", "layer 0) need 16,384", "budget: 16,384 or more"]),
    ({"auto": {"top_k": 9}}, ["top_k: 9", "this modality has (4", "top_k: 4 or less"]),
    ("auto", ["none were given", "MMTuningTrainer", "probe_batches", "--probe"]),
])
def test_limits_no_layer_can_meet_and_missing_data_are_refused(tiny, layers, message):
    model, inputs = tiny
    with pytest.raises(MMTuningError) as error:
        plan_with_probe(model, {"language": {"layers": layers}}, None if layers == "auto" else [inputs])
    for part in message:
        assert part in str(error.value)


def test_batches_without_answers_are_refused(tiny):
    model, inputs = tiny
    unlabelled = {**inputs, "labels": torch.full_like(inputs["labels"], -100)}
    with pytest.raises(MMTuningError, match="no answer tokens"):
        probe_layers(model, AUTO, [unlabelled])
    with pytest.raises(MMTuningError, match="training data is empty"):
        probe_layers(model, AUTO, [])


def test_the_trainer_probes_its_own_training_data_before_wrapping(tmp_path):
    model = tiny_model("llava")
    inputs = tiny_batch(model, batch=2).inputs
    session = MMTuning({"language": {"layers": {"auto": {"top_k": 2, "batches": 2}}}})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=5e-3,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=5)
    expected = probe_layers(model, session.config, [inputs, inputs], seed=5)  # what the trainer's first batches give
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(inputs, 8), data_collator=stack_rows,
                              mmtuning=session)
    plan = session.require_plan()
    assert plan.probe.summary() == expected.summary()
    assert plan.layers["language"] == expected.chosen["language"]
    wrapped_layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in trainer.model.named_parameters()
                      if "lora_" in n and "language_model" in n}
    assert wrapped_layers == set(expected.chosen["language"])
    trainer.train()
    assert trainer.state.global_step == 2


def test_inspect_targets_probe_prints_the_chosen_layers_and_their_scores(tmp_path):
    import json

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app
    from mmtuning_plugin.demo.data import make_set
    from mmtuning_plugin.demo.model import MODEL_DIR

    lines = []
    for index, item in enumerate(make_set("target", "eval", 6)):
        item.image.save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "question": item.question, "answer": item.answer}))
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    argv = ["inspect-targets", str(MODEL_DIR), "--probe", str(data), "--probe-batch-size", "3",
            "--set", "language.layers={auto: {top_k: 1}}", "--set", "vision.layers={auto: {budget: 20k}}"]
    result = runner.invoke(app, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    probe = report["plan"]["probe"]
    assert probe["batches"] == 2 and probe["answer_tokens"] == 12  # one answer word + end token per item
    language, vision = probe["modalities"]["language"], probe["modalities"]["vision"]
    assert len(language["chosen"]) == 1 and report["modalities"]["language"]["selected_layers"] == language["chosen"]
    assert sum(layer["params"] for layer in vision["layers"] if layer["chosen"]) <= 20_000
    assert report["modalities"]["vision"]["selected_layers"] == vision["chosen"] != []

    from rich.console import Console

    from mmtuning_plugin.config import layer_span
    from mmtuning_plugin.report import print_report

    out = Console(record=True, width=120)
    print_report(report, out)  # the table is drawn from this same JSON report
    text = out.export_text()
    assert "layers: auto - probe on 2 batch(es), 12 answer tokens" in text
    chosen = text.split("Chosen:")[1]
    assert f"vision {layer_span(vision['chosen'])}" in chosen
    assert f"language {language['chosen'][0]}" in chosen
