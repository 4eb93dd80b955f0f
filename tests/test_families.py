"""The bridged families train: tiny BLIP-2 / InstructBLIP with OPT and Flan-T5 language models, Llama 4 (MoE,
pixel-shuffle adapter), Kosmos-2, Florence-2 (DaViT + BART) and Gemma 4 run forward and backward with adapters on vision,
the bridge and the language model, and only adapters move."""

import pytest

from mmtuning_plugin.arch import resolve_layout
from mmtuning_plugin.targets import apply_plan, plan_targets
from mmtuning_plugin.testing.tiny_families import FAMILY_CASES, QFORMER_TYPES, tiny_family_batch, tiny_family_model

SPEC = {"vision": {"layers": {"top": 2}}, "projector": {}, "language": {"modules": "all-linear"}}
QFORMER_SPEC = {**SPEC, "projector": {"layers": {"top": 2}}}


@pytest.mark.parametrize(("model_type", "text"), FAMILY_CASES)
def test_adapters_on_every_modality_get_gradients(model_type, text):
    model = tiny_family_model(model_type, text)
    plan = plan_targets(model, QFORMER_SPEC if model_type in QFORMER_TYPES else SPEC)
    assert {m.modality for m in plan.modules} == {"vision", "projector", "language"}
    if model_type in QFORMER_TYPES:  # Q-Former layers 2-3 of 4 plus language_projection, never the lower ones
        bridge = plan.modules_of("projector")
        assert "language_projection" in {m.name for m in bridge}
        assert {m.leaf.layer for m in bridge} == {2, 3, None} and plan.layers["projector"] == [2, 3]
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
    from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows

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


# Published geometries (Salesforce/blip2-opt-2.7b, meta-llama/Llama-4-Scout-17B-16E config.json), written out
# so the test needs no download; the expected counts below are counted by hand from the module trees.
BLIP2_OPT_27B = {
    "model_type": "blip-2", "num_query_tokens": 32,
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
                      "image_size": 224, "patch_size": 14, "qkv_bias": True},
    "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                       "cross_attention_frequency": 2, "encoder_hidden_size": 1408, "vocab_size": 30522},
    "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "word_embed_proj_dim": 2560, "vocab_size": 50272,
                    "max_position_embeddings": 2048},
}
LLAMA4_SCOUT = {
    "model_type": "llama4",
    "vision_config": {"hidden_size": 1408, "intermediate_size": 5632, "num_hidden_layers": 34, "num_attention_heads": 16,
                      "image_size": 336, "patch_size": 14, "vision_output_dim": 4096, "projector_input_dim": 4096,
                      "projector_output_dim": 4096, "pixel_shuffle_ratio": 0.5},
    "text_config": {"hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                    "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
                    "vocab_size": 202048},
}
# (vision layers, vision Linear, projector layers, projector Linear, language layers, language Linear)
FULL_SIZE_COUNTS = {
    # ViT-g: 39 x (qkv, projection, fc1, fc2); Q-Former: 12 x (query/key/value/output.dense, intermediate_query,
    # output_query) + cross-attention (4) on the 6 even layers, + language_projection; OPT-2.7B: 32 x (q, k, v,
    # out_proj, fc1, fc2)
    "blip2-opt-2.7b": (BLIP2_OPT_27B, (39, 39 * 4, 12, 12 * 6 + 6 * 4 + 1, 32, 32 * 6)),
    # vision: 34 x (q, k, v, o, fc1, fc2); bridge: vision_adapter fc1/fc2 + multi_modal_projector.linear_1;
    # text: 48 MoE layers x (q, k, v, o, shared_expert gate/up/down); the 16 experts are fused 3-D weights and
    # the router is listed as kind `router`, never adapted
    "llama-4-scout": (LLAMA4_SCOUT, (34, 34 * 6, 0, 3, 48, 48 * 7)),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE_COUNTS))
def test_full_size_layouts_through_the_cli(tmp_path, name):
    import json

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    config, expected = FULL_SIZE_COUNTS[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["inspect-targets", str(tmp_path), "--json", "--set", "vision=true"])
    assert result.exit_code == 0, result.output
    modalities = json.loads(result.stdout)["modalities"]
    got = tuple(x for m in ("vision", "projector", "language")
                for x in (modalities[m]["layers"], len(modalities[m]["modules"])))
    assert got == expected


def test_a_blip2_adapter_splits_by_modality_through_convert(tmp_path):
    """One registration serves convert: the BLIP-2 map (its 5.x-only history included) tells `split` which
    adapter modules are vision, Q-Former bridge or language."""
    from mmtuning_plugin.convert.adapter import read_adapter
    from mmtuning_plugin.convert.split import split

    model = tiny_family_model("blip-2", "opt")
    model.config.save_pretrained(tmp_path / "base")
    peft_model = apply_plan(model, plan_targets(model, QFORMER_SPEC))
    peft_model.save_pretrained(tmp_path / "adapter")
    summary = split(tmp_path / "adapter", tmp_path / "lang", keep="language", base=str(tmp_path / "base"), progress=False)
    assert summary["dropped_modalities"] == ["projector", "vision"]
    kept = read_adapter(tmp_path / "lang").modules
    assert kept and all(m.startswith("language_model.model.decoder.layers.") for m in kept)
