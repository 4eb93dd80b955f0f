"""Per-modality quantization with real bitsandbytes on CPU: presets leave exactly the intended modules 16-bit."""

import json
import re

import pytest
import torch
from torch import nn

from mmtuning_plugin.config import load_config
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.loading import build_skeleton, load_model_config
from mmtuning_plugin.quant import (QuantMismatchError, allocated_weight_bytes, bnb_config_kwargs, memory_estimate,
                                   plan_quantization, policy_of, prepare_kbit_training, verify_quantized)
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")

# What each preset keeps 16-bit, spelled out by hand per architecture (module-name prefixes), independent of
# the code under test. lm_head is always kept.
EXPECTED_16BIT = {
    "llava": {
        "all-4bit": [],
        # LLaVA's projector reads vision layer -2: block 2 is the last one that matters, block 3 feeds nothing
        "balanced": ["model.multi_modal_projector", "model.vision_tower.encoder.layers.0.",
                     "model.vision_tower.encoder.layers.2."],
        "language-4bit": ["model.multi_modal_projector", "model.vision_tower"],
    },
    "qwen2_vl": {
        "all-4bit": [],
        "balanced": ["model.visual.merger", "model.visual.blocks.0.", "model.visual.blocks.3."],
        "language-4bit": ["model.visual"],
    },
    "idefics3": {
        "all-4bit": [],
        "balanced": ["model.connector", "model.vision_model.encoder.layers.0.", "model.vision_model.encoder.layers.3."],
        "language-4bit": ["model.connector", "model.vision_model"],
    },
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny architecture saved once (bf16) so every test can load it quantized."""
    paths = {}

    def get(model_type):
        if model_type not in paths:
            path = tmp_path_factory.mktemp(model_type)
            tiny_model(model_type, dtype=torch.bfloat16).save_pretrained(path)
            paths[model_type] = path
        return paths[model_type]

    return get


def load_quantized(path, kwargs):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(**kwargs) if kwargs else None
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16)


def linear_types(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("model_type", sorted(EXPECTED_16BIT))
def test_each_preset_keeps_exactly_the_intended_modules_16bit(saved, model_type):
    path = saved(model_type)
    for preset, kept_prefixes in EXPECTED_16BIT[model_type].items():
        config = load_config({"quant": preset})
        model = load_quantized(path, bnb_config_kwargs(config, load_model_config(str(path))))
        types = linear_types(model)
        expected_16 = {n for n in types if n == "lm_head" or any(n.startswith(p) for p in kept_prefixes)}
        really_16 = {n for n, t in types.items() if t is nn.Linear}
        assert really_16 == expected_16, preset
        assert all(types[n] is bnb.nn.Linear4bit for n in set(types) - expected_16), preset
        report = verify_quantized(model, config)
        assert sorted(report["language"]["16bit"]) == ["lm_head"]
        assert len(report["language"]["4bit"]) == 4 * 7


def test_verify_fails_loudly_when_the_host_quantized_the_towers(saved):
    """A host default (everything NF4 but lm_head) does not satisfy `balanced`: the error lists the modules."""
    path = saved("qwen2_vl")
    model = load_quantized(path, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    with pytest.raises(QuantMismatchError) as error:
        verify_quantized(model, load_config({"quant": "balanced"}))
    assert "model.visual.merger.mlp.0" in str(error.value)
    assert "model.visual.blocks.0.attn.qkv" in str(error.value)


def test_skip_list_is_anchored_full_names_and_bare_names_would_not_skip(saved):
    """transformers 5.20+ matches skip entries anchored or by suffix: an unanchored `visual` entry does not keep the
    tower 16-bit."""
    path = saved("qwen2_vl")
    kwargs = bnb_config_kwargs(load_config({"quant": "language-4bit"}), load_model_config(str(path)))
    assert kwargs["llm_int8_skip_modules"] == ["lm_head", "model.visual"]
    bare = load_quantized(path, {**kwargs, "llm_int8_skip_modules": ["lm_head", "visual"]})
    assert isinstance(bare.model.visual.blocks[0].attn.qkv, bnb.nn.Linear4bit)


def test_mllama_balanced_keeps_cross_attention_layers_and_both_vision_edges():
    config = load_model_config("mllama")
    config.text_config.num_hidden_layers, config.text_config.cross_attention_layers = 8, [3, 7]
    plan = plan_quantization(build_skeleton(config), policy_of("balanced"))
    reasons = set(plan.kept.values())
    assert {"cross-attention layer 3", "cross-attention layer 7", "first vision block", "last vision block the projector reads"} <= reasons
    assert "model.language_model.layers.3" in plan.skip_modules
    assert "model.vision_model.transformer.layers.0" in plan.skip_modules
    last_global = len(build_skeleton(config).model.vision_model.global_transformer.layers) - 1
    assert f"model.vision_model.global_transformer.layers.{last_global}" in plan.skip_modules
    assert not any(n.startswith("model.language_model.layers.2.") for n in plan.kept)


def test_keep_16bit_patterns_and_unknown_pattern_is_an_error():
    skeleton = build_skeleton(load_model_config("qwen2_5_vl"))
    plan = plan_quantization(skeleton, policy_of({"preset": "all-4bit", "keep_16bit": ["attn.proj"]}))
    assert sorted(plan.kept) == ["lm_head"] + sorted(f"model.visual.blocks.{i}.attn.proj" for i in range(32))
    with pytest.raises(MMTuningError, match=r"keep_16bit: \['attn.prj'\] match no Linear"):
        plan_quantization(skeleton, policy_of({"preset": "all-4bit", "keep_16bit": ["attn.prj"]}))


def test_policy_errors_name_the_key_and_absent_quant_means_no_policy():
    assert load_config({}).quant is None
    assert bnb_config_kwargs(load_config({}), load_model_config("qwen2_vl")) is None
    assert bnb_config_kwargs(load_config({"quant": "none"}), load_model_config("qwen2_vl")) is None
    with pytest.raises(MMTuningError, match=r"mmtuning.quant: unknown preset 'half'"):
        load_config({"quant": "half"})
    with pytest.raises(MMTuningError, match="one BitsAndBytesConfig"):
        load_config({"quant": {"vision": "int8", "language": "nf4"}})
    with pytest.raises(MMTuningError, match="use LoRA on it"):
        load_config({"quant": "all-4bit", "projector": {"full": True}})
    with pytest.raises(MMTuningError, match="every Linear it would quantize is kept 16-bit"):
        bnb_config_kwargs(load_config({"quant": {"preset": "language-4bit", "language": "none", "vision": "nf4",
                                                 "keep_16bit": ["blocks"]}}), load_model_config("qwen2_vl"))
    int8 = bnb_config_kwargs(load_config({"quant": {"vision": "int8", "language": "int8"}}), load_model_config("qwen2_vl"))
    assert int8 == {"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head", "model.visual.blocks.0",
                                                                     "model.visual.blocks.31", "model.visual.merger"]}


def test_lora_on_4bit_vision_and_projector_trains_end_to_end(saved, lora_params):
    path = saved("qwen2_vl")
    session = MMTuning({"quant": {"preset": "all-4bit", "checkpoint_vision": True}, "vision": {"layers": {"top": 2}},
                        "language": False})
    model = load_quantized(path, session.bnb_config_kwargs(load_model_config(str(path))))
    done = session.prepare_kbit_training(model)
    assert done["checkpointed"] == {"vision": 4} and done["upcast_params"] == 0
    model = session.wrap(model)
    assert isinstance(model.base_model.model.model.visual.merger.mlp[0].base_layer, bnb.nn.Linear4bit)
    assert isinstance(model.base_model.model.model.visual.blocks[3].attn.qkv.base_layer, bnb.nn.Linear4bit)
    session.verify_quantized(model)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = tiny_batch(model.get_base_model(), batch=1)
    model(**batch.inputs).loss.backward()
    optimizer.step()
    moved = {n for n, p in lora_params(model).items() if not torch.equal(p, before[n])}
    assert any("visual.merger" in n for n in moved) and any("visual.blocks.3" in n for n in moved)
    frozen_16bit = model.base_model.model.model.language_model.embed_tokens.weight
    assert frozen_16bit.dtype == torch.bfloat16 and not frozen_16bit.requires_grad


def test_training_a_4bit_projector_whole_is_an_error(saved):
    path = saved("llava")
    loaded = load_quantized(path, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    session = MMTuning({"projector": {"full": True}})
    with pytest.raises(MMTuningError, match=r"modules_to_save.*LoRA on it.*16-bit"):
        session.wrap(loaded)


def test_kbit_preparation_keeps_16bit_towers_16bit_and_norms_fp32(saved):
    path = saved("llava")
    config = load_config({"quant": "language-4bit"})
    model = load_quantized(path, bnb_config_kwargs(config, load_model_config(str(path))))
    done = prepare_kbit_training(model, config)
    vision_linear = model.model.vision_tower.encoder.layers[1].self_attn.q_proj
    assert type(vision_linear) is nn.Linear and vision_linear.weight.dtype == torch.bfloat16
    norm = model.model.vision_tower.encoder.layers[1].layer_norm1
    assert norm.weight.dtype == torch.float32 and "model.vision_tower.encoder.layers.1.layer_norm1" in done["fp32_norms"]
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model(**tiny_batch(model, batch=1).inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    upcast = load_config({"quant": {"preset": "language-4bit", "upcast_16bit": True}})
    model = load_quantized(path, bnb_config_kwargs(upcast, load_model_config(str(path))))
    assert prepare_kbit_training(model, upcast)["upcast_params"] > 0
    assert model.model.vision_tower.encoder.layers[1].self_attn.q_proj.weight.dtype == torch.float32


def test_reentrant_checkpointing_enables_input_grads_for_language_layers(saved, lora_params):
    path = saved("llava")
    session = MMTuning({"quant": {"preset": "balanced", "checkpoint_language": True, "checkpoint_reentrant": True},
                        "projector": False})
    model = load_quantized(path, session.bnb_config_kwargs(load_model_config(str(path))))
    done = session.prepare_kbit_training(model)
    assert done["input_grads"] == ["model.language_model.layers.0"]
    model = session.wrap(model)
    model.train()
    model(**tiny_batch(model.get_base_model(), batch=1).inputs).loss.backward()
    grads = [p.grad for n, p in lora_params(model).items() if "language_model.layers.0." in n and "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_memory_estimate_matches_allocated_bytes_of_a_loaded_model(saved):
    from mmtuning_plugin.targets import plan_targets

    path = saved("qwen2_vl")
    for preset in ("all-4bit", "balanced", "language-4bit"):
        config = load_config({"quant": preset, "vision": True})
        model = load_quantized(path, bnb_config_kwargs(config, load_model_config(str(path))))
        estimate = memory_estimate(build_skeleton(load_model_config(str(path))), config.quant)
        real = allocated_weight_bytes(model)
        assert abs(estimate["total"]["weight_bytes"] - real) / real < 0.05, (preset, estimate["total"], real)
    plan = plan_targets(build_skeleton(load_model_config(str(path))), config)
    with_plan = memory_estimate(build_skeleton(load_model_config(str(path))), config.quant, plan)
    assert with_plan["total"]["trainable_params"] == plan.trainable_params()
    assert with_plan["total"]["optimizer_state_bytes"] == 8 * plan.trainable_params()


def test_inspect_targets_json_ranks_presets(capsys):
    from mmtuning_plugin.cli import app
    from typer.testing import CliRunner

    totals = {}
    for preset in ("all-4bit", "balanced", "language-4bit", "none"):
        result = CliRunner().invoke(app, ["inspect-targets", "qwen2_5_vl", "--quant", preset, "--json"])
        assert result.exit_code == 0, result.output
        quant = json.loads(result.stdout)["quant"]
        assert set(quant["modalities"]) == {"vision", "projector", "language"}
        assert all("weight_bytes" in row for row in quant["modalities"].values())
        totals[preset] = quant["total"]["weight_bytes"]
    assert totals["all-4bit"] < totals["balanced"] < totals["language-4bit"] < totals["none"]
    bad = CliRunner().invoke(app, ["inspect-targets", "qwen2_5_vl", "--quant", "half"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output


def test_balanced_projector_trained_whole_stays_16bit_and_verifies_after_wrapping(saved):
    path = saved("llava")
    session = MMTuning({"quant": "balanced", "projector": {"full": True}, "language": {"layers": {"top": 1}}})
    model = load_quantized(path, session.bnb_config_kwargs(load_model_config(str(path))))
    model = session.wrap(model)
    report = session.verify_quantized(model)
    assert sorted(report["projector"]["16bit"]) == ["model.multi_modal_projector.linear_1",
                                                    "model.multi_modal_projector.linear_2"]
    assert report["projector"]["4bit"] == [] and len(report["vision"]["4bit"]) == 2 * 6


def test_int8_policy_loads_8bit_with_the_same_modules_kept(saved):
    path = saved("qwen2_vl")
    config = load_config({"quant": {"preset": "balanced", "vision": "int8", "language": "int8"}})
    model = load_quantized(path, bnb_config_kwargs(config, load_model_config(str(path))))
    types = linear_types(model)
    kept = {n for n, t in types.items() if t is nn.Linear}
    assert kept == {n for n in types if n == "lm_head" or n.startswith(("model.visual.merger", "model.visual.blocks.0.",
                                                                          "model.visual.blocks.3."))}
    assert all(types[n] is bnb.nn.Linear8bitLt for n in set(types) - kept)
    report = verify_quantized(model, config)
    assert len(report["vision"]["8bit"]) == 8 and report["vision"]["4bit"] == []
