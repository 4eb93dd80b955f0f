"""The bridged families train: tiny BLIP-2 / InstructBLIP with OPT and Flan-T5 language models run forward and
backward with adapters on vision, the Q-Former bridge and the language model, and only adapters move."""

import pytest

from mmtuning_plugin.arch import resolve_layout
from mmtuning_plugin.targets import apply_plan, plan_targets
from mmtuning_plugin.tiny_families import FAMILY_CASES, tiny_family_batch, tiny_family_model

SPEC = {"vision": {"layers": {"top": 2}}, "projector": {"layers": {"top": 2}}, "language": {"modules": "all-linear"}}


@pytest.mark.parametrize(("model_type", "text"), FAMILY_CASES)
def test_adapters_on_every_modality_get_gradients(model_type, text):
    model = tiny_family_model(model_type, text)
    plan = plan_targets(model, SPEC)
    assert {m.modality for m in plan.modules} == {"vision", "projector", "language"}
    # Q-Former layers 2-3 of 4 plus language_projection, never the lower Q-Former layers
    bridge = plan.modules_of("projector")
    assert "language_projection" in {m.name for m in bridge}
    assert {m.leaf.layer for m in bridge} == {2, 3, None}
    peft_model = apply_plan(model, plan)
    peft_model.train()
    peft_model(**tiny_family_batch(model).inputs).loss.backward()
    moved = dict.fromkeys(("vision", "projector", "language"), False)
    for name, param in peft_model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if "lora_B" in name and param.grad is not None and param.grad.abs().sum() > 0:
            moved[plan.modality_of(name.removeprefix("base_model.model.").split(".lora_B")[0])] = True
    assert moved == {"vision": True, "projector": True, "language": True}


def test_t5_language_layers_are_encoder_then_decoder_and_top_n_is_the_decoder_top():
    layout = resolve_layout(tiny_family_model("blip-2", "t5"))
    assert layout.layer_counts == {"vision": 4, "projector": 4, "language": 4}  # 2 encoder + 2 decoder blocks
    by_layer = {leaf.layer: leaf.name for leaf in layout.leaves_of("language") if leaf.layer is not None}
    assert by_layer[0].startswith("language_model.encoder.block.0.") and by_layer[3].startswith("language_model.decoder.block.1.")
    plan = plan_targets(tiny_family_model("blip-2", "t5"), {"language": {"layers": {"top": 2}}, "vision": False, "projector": False})
    assert {m.name.split(".block.")[0] for m in plan.modules} == {"language_model.decoder"}
    kinds = {m.leaf.local: m.leaf.kind for m in plan.modules}
    assert kinds["layer.0.SelfAttention.q"] == "attention" and kinds["layer.1.EncDecAttention.k"] == "attention"
    assert kinds["layer.2.DenseReluDense.wi"] == "mlp"


def test_blip2_fine_tunes_through_the_trainer_with_quant_balanced(tmp_path):
    """BLIP-2 (OPT) loaded with the `balanced` policy's bitsandbytes config (4-bit language model and middle
    vision layers, 16-bit Q-Former bridge and vision edges) trains through MMTuningTrainer: loss goes down,
    one optimizer group per modality, and the quantized layout is the one the policy planned."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, TrainingArguments

    from mmtuning_plugin.config import load_config
    from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
    from mmtuning_plugin.loading import load_model_config
    from mmtuning_plugin.quant import bnb_config_kwargs
    from mmtuning_plugin.tiny import RepeatedBatch, stack_rows

    tiny_family_model("blip-2", "opt", dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    settings = {"quant": "balanced", "vision": {"layers": {"top": 2}}, "projector": {"layers": {"top": 2}}}
    kwargs = bnb_config_kwargs(load_config(settings), load_model_config(str(tmp_path / "base")))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(**kwargs),
                                                        dtype=torch.bfloat16)
    assert isinstance(model.language_model.model.decoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.qformer.encoder.layer[0].attention.attention.query) is torch.nn.Linear
    assert type(model.language_projection) is torch.nn.Linear
    batch = tiny_family_batch(model)
    model, session = prepare_model(model, settings)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=12,
                             learning_rate=5e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, 8),
                              data_collator=stack_rows, mmtuning=session)
    trainer.train()
    assert sorted(group["name"] for group in trainer.optimizer.param_groups) == ["language", "projector", "vision"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
