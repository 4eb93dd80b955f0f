"""Every 4-bit forward without grad stays trainable on CPUs with AVX512-BF16, whatever CPU runs the suite.

bitsandbytes decides at `Linear4bit` construction whether the CPU has AVX512-BF16 (`has_avx512bf16()` in
`bitsandbytes.nn.modules`); on such a CPU an eval-mode forward without grad repacks the weight in place (FACTS
section 10/12), small layers fail outright and training fails afterwards. The fixture makes every layer built in the
test believe it runs on such a CPU, so each path below is checked for the repack on any machine. The first test
shows that the forced condition really repacks (each later test can fail on its cause)."""

import json

import pytest
import torch
from transformers import BitsAndBytesConfig, TrainingArguments

from mmtuning_plugin.base_view import linear_4bit_layers, repacked_4bit_layers
from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.evaluate import EvalItem, score_sets
from mmtuning_plugin.integrations.hf import MMTuningTrainer, from_pretrained
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch
from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

BALANCED = {"vision": {"modules": "attention"}, "quant": "balanced"}


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every Linear4bit built from here on takes this CPU for one with AVX512-BF16."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("cpu4bit") / "llava")


def load_4bit(path):
    """A plain 4-bit load of every Linear but lm_head, vision tower included, no mmtuning involved (what a test
    builder or a user's own code starts from)."""
    from transformers import AutoModelForImageTextToText

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["lm_head"])
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def train_step(model, inputs):
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    return float(loss)


def test_the_forced_condition_repacks_an_unguarded_forward(avx512bf16_cpu, checkpoint):
    model = load_4bit(checkpoint).eval()
    assert linear_4bit_layers(model) and all(m.support_avx512bf16_for_cpu for m in linear_4bit_layers(model))
    inputs = {k: v for k, v in tiny_batch(model, batch=1).inputs.items() if k != "labels"}
    try:
        with torch.no_grad():
            model(**inputs)
        failed = False
    except RuntimeError as error:  # layers narrower than bitsandbytes' 32-row block fail while repacking
        assert "invalid for input of size" in str(error)
        failed = True
    assert failed or repacked_4bit_layers(model)


def test_the_test_builders_measure_a_4bit_model_without_repacking(avx512bf16_cpu, checkpoint):
    model = load_4bit(checkpoint).eval()
    batch = tiny_batch(model, batch=2)  # runs the vision tower in eval mode without grad to count image tokens
    assert repacked_4bit_layers(model) == []
    model.train()
    assert torch.isfinite(model(**batch.inputs).loss)  # the training layout still computes


def test_a_wrapped_model_keeps_its_layout_through_the_trainers_evaluation_loop(avx512bf16_cpu, checkpoint, tmp_path):
    model, session = from_pretrained(checkpoint, BALANCED, dtype=torch.float32)
    assert linear_4bit_layers(model) and not any(m.support_avx512bf16_for_cpu for m in linear_4bit_layers(model))
    batch = tiny_batch(model, batch=2).inputs
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                             max_steps=3, eval_strategy="steps", eval_steps=1, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch, 6),
                              eval_dataset=RepeatedBatch(batch, 2), data_collator=stack_rows, mmtuning=session)
    trainer.train()  # eval (eval mode, no grad) between training steps
    assert repacked_4bit_layers(model) == []
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 3 and all(torch.isfinite(torch.tensor(evals)))


def test_scoring_and_the_demo_base_never_repack(avx512bf16_cpu, tmp_path):
    processor = load_processor(MODEL_DIR)
    session = MMTuning({"language": {"modules": "attention"}, "quant": "balanced"})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=True))
    for layer in linear_4bit_layers(model):  # undo the session's own guard: score_sets must hold by itself
        layer.support_avx512bf16_for_cpu = True
    items = []
    for index, item in enumerate(make_set("general", "eval", 2)):
        item.image.save(tmp_path / f"{index}.png")
        items.append(EvalItem(image=tmp_path / f"{index}.png", question=item.question, answer=item.answer, kind="x"))
    report = score_sets(model, processor, {"target": items, "general": items}, match="exact", max_new_tokens=4)
    assert repacked_4bit_layers(model) == [] and report["sets"]["general"]["items"] == 2
    assert train_step(model, training_batch(encode(processor, make_set("target", "train", 2)), 0)) > 0
    json.dumps(report)  # plain data, as `mmtune eval --json` prints it


def test_the_probe_scores_a_4bit_model_without_repacking(avx512bf16_cpu, checkpoint):
    from mmtuning_plugin.probe import probe_layers

    model = load_4bit(checkpoint).eval()
    inputs = tiny_batch(model, batch=2).inputs
    session = MMTuning({"language": {"layers": {"auto": {"top_k": 1}}}})
    result = probe_layers(model, session.config, [inputs], seed=0)
    assert result.chosen["language"] and repacked_4bit_layers(model) == []
