"""Alignment losses inside real training: the HF Trainer (logging, gradient accumulation scaling, step
callback), gradient checkpointing, 4-bit bitsandbytes bases, bf16, and a loss added by an installed plugin."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.losses.sculpt import conflict_mask
from mmtuning_plugin.session import MMTuning
from helpers import perturb_lora_b
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

HERE = Path(__file__).parent


def arguments(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3,
                logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                remove_unused_columns=False, seed=0)
    return TrainingArguments(**{**base, **overrides})


def test_trainer_logs_each_loss_and_feeds_steps_to_warmup_and_sparsification(tmp_path):
    model = tiny_model("llava")
    inputs = tiny_batch(model, batch=4).inputs
    session = MMTuning({"vision": {"layers": {"top": 2}}, "losses": {
        "anchor": {"weight": 0.5, "warmup_steps": 2}, "contrastive": {"weight": 0.05},
        "sculpt": {"weight": 1e-3, "sparsify_from": 4, "keep": 0.2}}})
    model = session.wrap(model)
    trainer = MMTuningTrainer(model=model, args=arguments(tmp_path), train_dataset=RepeatedBatch(inputs, 8),
                              data_collator=stack_rows, mmtuning=session)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for key in ("loss_align/anchor", "loss_align/contrastive", "loss_align/sculpt"):
        values = [entry[key] for entry in logged]
        assert all(torch.isfinite(torch.tensor(values))), (key, values)
    assert logged[-1]["loss_align/anchor"] > 0 and logged[-1]["loss_align/sculpt"] > 0
    assert session.losses.step == 6
    sculpt = model.mmtuning_losses["sculpt"]
    for _, layer, adapter in sculpt._layers:
        share = (layer.lora_A[adapter].weight != 0).float().mean().item()
        assert share <= 0.21, share


def one_sgd_step(tmp_path, inputs, batch, accumulation, accepts_loss_kwargs):
    model = tiny_model("llava")
    session = MMTuning({"dropout": 0.0, "losses": {"anchor": {"weight": 50.0, "metric": "mse"}}})
    model = session.wrap(model)
    perturb_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = arguments(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(inputs), data_collator=stack_rows, mmtuning=session)
    if accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    anchor = [e["loss_align/anchor"] for e in trainer.state.log_history if "loss_align/anchor" in e]
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}, trainer, anchor


@pytest.mark.parametrize("accepts_loss_kwargs", [None, False])
def test_gradient_accumulation_scales_extra_losses_like_the_task_loss(tmp_path, accepts_loss_kwargs):
    """Accumulating 2 micro-batches of 2 gives the same update as one batch of 4, whether transformers
    normalises the task loss by num_items_in_batch (model accepts loss kwargs) or divides it by the steps."""
    inputs = tiny_batch(tiny_model("llava"), batch=4).inputs
    accumulated, trainer, anchor_logs = one_sgd_step(tmp_path / "ga", inputs, 2, 2, accepts_loss_kwargs)
    whole, _, _ = one_sgd_step(tmp_path / "whole", inputs, 4, 1, accepts_loss_kwargs)
    if accepts_loss_kwargs is None:
        assert trainer.model_accepts_loss_kwargs  # the num_items_in_batch branch is the one exercised
    assert anchor_logs and anchor_logs[0] > 1e-4  # the extra term is large enough to matter
    moved = max(update.abs().max().item() for update in whole.values())
    assert moved > 1e-3
    for name, update in whole.items():
        assert torch.allclose(accumulated[name], update, atol=1e-6, rtol=1e-3), name


LOSSES_WITH_LAYERS = {"anchor": {"weight": 1.0}, "contrastive": {"weight": 1.0},
                      "multiscale": {"weight": 1.0, "of": "contrastive", "layers": [1, -1]}}


def gradients(model, session, inputs):
    model.zero_grad()
    outputs = model(**inputs)
    terms = session.extra_losses(model, inputs, outputs)
    (outputs.loss + sum(terms.values())).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, terms


def test_gradient_checkpointing_reentrant_or_not_gives_the_same_gradients():
    """transformers 5 checkpoints a layer's `forward`, so the capture hooks stay outside the checkpoint."""
    model = tiny_model("qwen2_vl")
    inputs = tiny_batch(model, batch=3).inputs
    session = MMTuning({"dropout": 0.0, "vision": {"layers": {"top": 2}}, "losses": LOSSES_WITH_LAYERS})
    model = session.wrap(model)
    perturb_lora_b(model)
    model.train()
    plain, terms = gradients(model, session, inputs)
    assert set(terms) == {f"loss_align/{n}" for n in LOSSES_WITH_LAYERS}

    model.enable_input_require_grads()
    for kwargs in ({}, {"use_reentrant": True}):  # transformers' default is non-reentrant
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        assert model.is_gradient_checkpointing
        checkpointed, _ = gradients(model, session, inputs)
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-4), (kwargs, name)


def test_a_trainable_module_output_without_graph_is_refused():
    """If a host checkpointed a hooked module as a whole (hooks inside a reentrant checkpoint), the captured
    output has no autograd history: the loss would train nothing there, so it raises instead."""
    model = tiny_model("llava")
    inputs = tiny_batch(model, batch=2).inputs
    session = MMTuning({"losses": {"anchor": {}}})
    model = session.wrap(model)
    model.train()
    projector = model.get_base_model().model.multi_modal_projector
    original = projector.forward
    projector.forward = lambda *a, **k: original(*a, **k).detach()
    outputs = model(**inputs)
    with pytest.raises(MMTuningError, match="use_reentrant: false"):
        session.extra_losses(model, inputs, outputs)


def test_four_bit_base_weights(tmp_path):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    import bitsandbytes as bnb

    tiny_model("llava").save_pretrained(tmp_path / "tiny")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               # QLoRA's usual split: 4-bit language model, 16/32-bit vision tower and projector
                               # (bitsandbytes' CPU kernel also needs in_features >= 64, the tiny tower is 32 wide)
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny", quantization_config=quant, device_map="cpu")
    inputs = tiny_batch(model, batch=2).inputs
    session = MMTuning({"losses": {"anchor": {"weight": 1.0, "metric": "mse"}, "sculpt": {"weight": 1.0}}})
    model = session.wrap(model)
    model.train()
    sculpt = model.mmtuning_losses["sculpt"]
    quantized = [(mask, layer) for mask, (_, layer, _) in zip(sculpt._masks, sculpt._layers)
                 if isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 3  # q/k/v of the 4 language layers
    for mask, layer in quantized:  # the mask is the formula on the dequantized base weight
        weight = layer.get_base_layer().weight
        dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        assert mask.shape == weight.quant_state.shape
        assert torch.allclose(mask, conflict_mask(dequantized, 1.0, 1e-8))
    outputs = model(**inputs)
    terms = session.extra_losses(model, inputs, outputs)
    assert terms["loss_align/anchor"].item() == 0 and terms["loss_align/sculpt"].item() == 0

    perturb_lora_b(model)
    outputs = model(**inputs)
    terms = session.extra_losses(model, inputs, outputs)
    assert all(v.item() > 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    assert with_grad and all(p.requires_grad and torch.isfinite(p.grad).all() for p in with_grad)


def test_bf16_model_gives_finite_losses_and_gradients():
    model = tiny_model("idefics3", dtype=torch.bfloat16)
    inputs = tiny_batch(model, batch=3).inputs
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    session = MMTuning({"vision": {"layers": {"top": 2}}, "losses": {
        "anchor": {}, "contrastive": {}, "sculpt": {}, "multiscale": {"layers": [-1]}}})
    model = session.wrap(model)
    model.train()
    assert {m.dtype for m in model.mmtuning_losses["sculpt"]._masks} == {torch.bfloat16}  # 16-bit masks, like W
    perturb_lora_b(model)
    outputs = model(**inputs)
    terms = session.extra_losses(model, inputs, outputs)
    assert len(terms) == 4 and all(torch.isfinite(v) and v.item() > 0 for v in terms.values())
    sum(terms.values()).backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    assert with_grad and all(p.requires_grad and torch.isfinite(p.grad).all() for p in with_grad)


def test_an_installed_package_adds_a_loss_by_entry_point(tmp_path):
    shutil.copy(HERE / "example_plugin" / "mmtuning_hidden_norm.py", tmp_path / "mmtuning_hidden_norm.py")
    info = tmp_path / "mmtuning_hidden_norm-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmtuning-hidden-norm\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmtuning]\nhidden_norm = mmtuning_hidden_norm\n")
    (info / "RECORD").write_text("")
    script = (
        "import json; from mmtuning_plugin.session import MMTuning; from mmtuning_plugin.losses import registered_losses\n"
        "s = MMTuning({'losses': {'hidden_norm': {'weight': 0.5, 'target': 1.0}}})\n"
        "print(json.dumps({'names': sorted(registered_losses()), 'target': s.config.losses['hidden_norm'].target}))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"names": ["anchor", "contrastive", "hidden_norm", "moe_balance", "multiscale", "sculpt"], "target": 1.0}
