"""Calibrated LoRA starts per modality (`init: pissa | milora | olora | corda`): the factors come from each base
weight's decomposition (CorDA's from the weight times the inputs' covariance on the first training batches), the model still starts as the base, the adapter-off model stays the base (keep), the frozen half
stays frozen through training (weight decay included), the saved adapter is a plain LoRA on the original base,
4-bit bases work, and what cannot work is refused."""

import pytest
import torch
from transformers import TrainingArguments

from mmtuning_plugin.base_view import adapters_disabled, cpu_4bit_repack_off
from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

BLOCK = {"vision": {"init": "pissa", "r": 4, "layers": {"top": 2}}, "projector": {"init": "olora"},
         "language": {"init": "milora"}, "r": 8, "dropout": 0.0}


def lora_layer(model, name):
    return model.get_submodule("base_model.model." + name)


def test_each_init_starts_from_its_decomposition_and_the_model_from_the_base():
    model = tiny_model("llava")
    batch = tiny_batch(model).inputs
    with torch.no_grad():
        base = model(**batch).logits
    session = MMTuning(BLOCK)
    wrapped = session.wrap(model).eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(**batch).logits, base, atol=1e-5)
        with adapters_disabled(wrapped):
            assert torch.equal(wrapped(**batch).logits, base)
    plan = session.require_plan()
    for planned in plan.modules:
        layer = lora_layer(wrapped, planned.name)
        r, scale = planned.r, layer.scaling["default"]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape[0] == 2 * r and torch.equal(a[:r], a[r:]) and torch.equal(b[:, :r], -b[:, r:])
        weight = layer.get_base_layer().weight.detach().float()
        part = scale * b[:, :r] @ a[:r]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        if planned.modality == "vision":  # PiSSA: the r principal components
            expected = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        elif planned.modality == "language":  # MiLoRA: the r minor ones
            expected = u[:, -r:] @ torch.diag(s[-r:]) @ vh[-r:]
        else:  # OLoRA: Q_r R_r
            q, upper = torch.linalg.qr(weight)
            expected = q[:, :r] @ upper[:r]
        assert torch.allclose(part, expected, atol=1e-3 * float(s[0])), planned.name
    assert layer.scaling["default"] == pytest.approx(plan.config.scale_alpha("language") / plan.config.rank("language"))


def test_the_frozen_half_stays_through_training_and_the_adapter_loads_as_plain_lora(tmp_path):
    from peft import PeftModel

    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2).inputs
    session = MMTuning(BLOCK)
    wrapped = session.wrap(model)
    plan = session.require_plan()
    start = {m.name: (lora_layer(wrapped, m.name).lora_A["default"].weight.detach().clone(),
                      lora_layer(wrapped, m.name).lora_B["default"].weight.detach().clone()) for m in plan.modules}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             weight_decay=0.5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False)
    MMTuningTrainer(model=wrapped, args=args, train_dataset=RepeatedBatch(batch, 8), data_collator=stack_rows,
                    mmtuning=session).train()
    moved = 0
    for planned in plan.modules:
        r, (a0, b0) = planned.r, start[planned.name]
        layer = lora_layer(wrapped, planned.name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(a[r:], a0[r:]) and torch.equal(b[:, r:], b0[:, r:]), planned.name  # frozen, decay undone
        moved += not torch.equal(b[:, :r], b0[:, :r])
    assert moved == len(plan.modules)
    wrapped.eval()
    with torch.no_grad():
        trained = wrapped(**batch).logits
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    fresh = PeftModel.from_pretrained(tiny_model("llava"), str(tmp_path / "adapter")).eval()  # no mmtuning involved
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, trained, atol=1e-5)


def test_keep_sees_the_base_and_a_4bit_language_model_is_calibrated_from_its_dequantized_weights(tmp_path):
    processor = load_processor(MODEL_DIR)
    rows = encode(processor, make_set("target", "train", 8, seed=5))
    block = {"quant": "balanced", "language": {"modules": "attention", "init": "pissa"}, "projector": {"init": "olora"},
             "keep": {"prompts": ["what is the colour of the shape ?"], "ramp": 0}}
    session = MMTuning(block)
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=True))
    batch = training_batch(rows[:2], processor.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad(), cpu_4bit_repack_off(model):
        on = model(**batch).logits
        with adapters_disabled(model):
            off = model(**batch).logits
    assert torch.allclose(on, off, atol=1e-4)  # the calibrated start cancels: the model starts as the base
    layer = lora_layer(model, "model.language_model.layers.0.self_attn.q_proj")
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    assert layer.lora_B["default"].weight.abs().sum() > 0  # B starts from the decomposition, not at zero
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=rows, mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    trainer.train()
    keep = [e["loss_keep"] for e in trainer.state.log_history if "loss_keep" in e]
    # the first step's KL to the adapter-off model is 0: that model is the base, and the run starts there
    assert len(keep) == 2 and abs(keep[0]) < 1e-4 and keep[1] > 1e-3


@pytest.mark.parametrize("block, words", [
    ({"init": "pissa", "method": "adapter"}, ["needs method: lora"]),
    ({"language": {"init": "olora"}, "use_dora": True}, ["use_dora"]),
    ({"init": "loftq"}, ["init", "'lora', 'pissa', 'milora', 'olora' or 'corda'"]),
    ({"language": {"init": "corda"}}, ["init: corda", "first training batches", "probe_batches", "init: pissa"]),
    ({"language": {"init": "pissa", "include": ["embed_tokens"]}}, ["language.init: pissa", "embed_tokens", "init: lora"]),
])
def test_what_a_calibrated_start_cannot_do_is_refused(block, words):
    with pytest.raises(MMTuningError) as error:
        MMTuning(block).wrap(tiny_model("llava"))
    for word in words:
        assert word in str(error.value), str(error.value)


def input_covariance(model, name, batches):
    """E[x x^T] of a module's inputs over every token of `batches`, read on the unwrapped model."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    x = torch.cat(seen)
    return x.T @ x / len(x)


def test_corda_starts_from_the_weight_times_the_input_covariance_of_the_first_batches():
    from mmtuning_plugin.methods.inits import DAMPING

    model = tiny_model("llava").eval()
    batches = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        batches.append(tiny_batch(model, batch=2).inputs)
    block = {"language": {"init": "corda", "modules": "attention"}, "vision": False, "projector": False, "r": 4,
             "dropout": 0.0, "init_batches": 2}
    name = "model.language_model.layers.1.self_attn.q_proj"
    cov = input_covariance(model, name, batches[:2])  # init_batches: 2, so the third batch is not read
    with torch.no_grad():
        base = model(**batches[2]).logits
    wrapped = MMTuning(block).wrap(model, probe_batches=iter(batches)).eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(**batches[2]).logits, base, atol=1e-5)  # starts as the base
    layer = lora_layer(wrapped, name)
    r, scale = 4, layer.scaling["default"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape[0] == 2 * r and torch.equal(a[:r], a[r:]) and torch.equal(b[:, :r], -b[:, r:])
    weight = layer.get_base_layer().weight.detach().double()
    damped = cov + torch.eye(len(cov), dtype=cov.dtype) * DAMPING * cov.diagonal().mean()
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    expected = u[:, :r] @ torch.diag(s[:r]) @ vh[:r] @ torch.linalg.inv(damped)
    part = scale * b[:, :r].double() @ a[:r].double()
    assert torch.allclose(part, expected, atol=1e-4 * float(expected.abs().max())), (part - expected).abs().max()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # not PiSSA's start: the data weighs the directions
    assert not torch.allclose(part, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-2 * float(s[0]))


def test_corda_reads_the_trainers_first_batches_and_refuses_batches_that_miss_its_modules(tmp_path):
    model = tiny_model("llava")
    made = tiny_batch(model, batch=2)
    batch = made.inputs
    block = {"language": {"init": "corda", "modules": "attention"}, "vision": False, "projector": {"init": "corda"},
             "r": 4, "dropout": 0.0}
    session = MMTuning(block)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch, 4), data_collator=stack_rows,
                              mmtuning=session)  # the unwrapped model: the trainer wraps it on its first batches
    assert len(session.init_batches) == 2  # all the dataset's batches, fewer than init_batches (8)
    trainer.train()
    layer = lora_layer(trainer.model, session.require_plan().modules[0].name)
    assert layer.lora_A["default"].weight.shape[0] == 8
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == made.image_token_id, 1)
    with pytest.raises(MMTuningError, match="init: corda: model.multi_modal_projector.linear_1 got no input"):
        MMTuning(block).wrap(tiny_model("llava"), probe_batches=[text_only])
