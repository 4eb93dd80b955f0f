"""Adapter methods as a registry, and mmtuning's own PEFT methods: bottleneck adapters (`adapter`) and
modality-routed LoRA experts (`moe-lora`) on real tiny models, 16-bit and 4-bit, through the Trainer with keep and a
layer schedule, saved and reloaded in a fresh process with identical logits, scored by `mmtune eval`, refused by
`mmtune convert`."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmtuning_plugin import plugins
from mmtuning_plugin.base_view import adapters_disabled, cpu_4bit_repack_off
from mmtuning_plugin.cli import app
from mmtuning_plugin.config import load_config
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.methods import registered_methods
from mmtuning_plugin.methods.bottleneck import BottleneckLinear
from mmtuning_plugin.methods.moe_lora import MoeLoraLinear, load_balance, moe_layers
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.targets import plan_targets
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model
from mmtuning_plugin.testing.tiny_families import tiny_family_batch, tiny_family_model
from transformers import TrainingArguments

HERE = Path(__file__).parent
runner = CliRunner()
PROMPTS = ["what is the colour of the shape ?", "what shape is in the image ?"]


def arguments(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                remove_unused_columns=False, seed=0)
    return TrainingArguments(**{**base, **overrides})


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- the registry --------------------------------------------------------------------------------------


def test_every_builtin_method_is_registered_through_the_hook_and_listed():
    assert set(registered_methods()) >= {"lora", "ia3", "loha", "lokr", "adapter", "moe-lora"}
    report = json.loads(runner.invoke(app, ["plugins", "--json"]).output)
    by_name = {p["name"]: p for p in report["plugins"]}
    assert by_name["builtin_methods"]["registered"] == {"methods": ["adapter", "ia3", "loha", "lokr", "lora", "moe-lora"]}
    assert {h["hook"]: h["signature"] for h in report["hooks"]}["register_methods"] == \
        "register(name: str, method_class: type[AdapterMethod])"


@pytest.mark.parametrize("block, words", [
    ({"method": "lorra"}, ["unknown method 'lorra'", "`lora`", "moe-lora"]),
    ({"method": {"name": "adapter", "experts": 2}}, ["adapter.experts", "reduction, nonlinearity"]),
    ({"method": {"name": "moe-lora", "experts": 1}}, ["moe-lora.experts", "greater than or equal to 2"]),
    ({"method": {"experts": 2}}, ["needs its `name`"]),
    ({"method": {"name": "moe-lora"}, "method_options": {"experts": 3}}, ["not both"]),
    ({"method": "lora", "method_options": {"experts": 3}}, ["lora.experts", "it has no options"]),
])
def test_bad_method_settings_name_the_key_and_the_fix(block, words):
    with pytest.raises(MMTuningError) as error:
        load_config(block)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_block_form_and_options_form_are_the_same_and_round_trip():
    block = load_config({"method": {"name": "moe-lora", "experts": 3, "balance": 0.05}})
    same = load_config({"method": "moe-lora", "method_options": {"experts": 3, "balance": 0.05}})
    assert block == same and block.method_options.experts == 3
    assert block.losses["moe_balance"].weight == 0.05  # the method brings its balance term
    assert load_config({"method": block.method, "method_options": block.method_options.model_dump()}) == block
    assert "moe_balance" not in load_config({"method": {"name": "moe-lora", "balance": 0}}).losses
    explicit = load_config({"method": "moe-lora", "losses": {"moe_balance": {"weight": 0.5}}})
    assert explicit.losses["moe_balance"].weight == 0.5  # the block's own setting wins


def test_a_plugin_method_plugs_in_and_trains_through_peft():
    sys.path.insert(0, str(HERE / "example_plugin"))
    try:
        import mmtuning_scaled_lora

        plugins.register_plugin(mmtuning_scaled_lora, name="scaled-lora-test")
        model = tiny_model("llava")
        session = MMTuning({"method": {"name": "scaled-lora", "scale": 3}, "r": 4, "alpha": 8})
        wrapped = session.wrap(model)
        layer = wrapped.base_model.model.model.language_model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(3 * 8 / 4)
        report = json.loads(runner.invoke(app, ["plugins", "--json"]).output)
        assert {p["name"]: p for p in report["plugins"]}["scaled-lora-test"]["registered"] == {"methods": ["scaled-lora"]}
    finally:
        plugins.unregister_plugin(plugins.plugin_manager().get_plugin("scaled-lora-test"))
        sys.path.remove(str(HERE / "example_plugin"))
    assert "scaled-lora" not in registered_methods()


# --- bottleneck adapters ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, outputs", [
    ("llava", {"self_attn.o_proj", "mlp.down_proj", "self_attn.out_proj", "mlp.fc2", "linear_2"}),
    ("qwen2_vl", {"self_attn.o_proj", "mlp.down_proj", "attn.proj", "mlp.fc2", "mlp.2"}),
])
def test_adapter_goes_after_each_block_output_and_counts_what_peft_creates(model_type, outputs):
    model = tiny_model(model_type)
    plan = plan_targets(model, {"method": "adapter", "vision": True, "r": 4})
    locals_ = {m.leaf.local for m in plan.modules}
    assert locals_ == outputs
    per_block = {(m.modality, m.leaf.layer, m.leaf.kind) for m in plan.modules}
    assert len(per_block) == len(plan.modules)  # one adapter per block (attention, MLP) and one on the projector
    wrapped = MMTuning({"method": "adapter", "vision": True, "r": 4}).wrap(model)
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == plan.trainable_params()
    assert all(isinstance(wrapped.get_submodule("base_model.model." + m.name), BottleneckLinear) for m in plan.modules)


def test_adapter_starts_as_the_base_and_reduction_sets_its_width():
    model = tiny_model("llava")
    batch = tiny_batch(model)
    with torch.no_grad():
        base = model(**batch.inputs).logits
    wrapped = MMTuning({"method": {"name": "adapter", "reduction": 8}, "language": {"modules": "mlp"}}).wrap(model)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch.inputs).logits, base)  # the up-projection starts at zero
    layer = wrapped.base_model.model.model.language_model.layers[0].mlp.down_proj
    assert layer.bottleneck_down["default"].out_features == layer.out_features // 8
    with pytest.raises(MMTuningError, match="no weight delta to merge"):
        wrapped.merge_and_unload()


@pytest.mark.parametrize("method", ["adapter", {"name": "adapter", "reduction": 4}, "moe-lora"])
def test_per_modality_sizes_reach_every_layer_and_are_checked_after_wrapping(method):
    """vision r 2, projector r 4, language r 8: each layer gets its modality's size (the first planned module is a
    vision one, so a size taken from it instead of the config's default would go wrong)."""
    block = {"method": method, "vision": {"r": 2}, "projector": {"r": 4}, "r": 8}
    model = tiny_model("llava")
    plan = plan_targets(model, block)
    wrapped = MMTuning(block).wrap(model)  # raises PlanMismatchError on any size that differs from the plan
    sizes = {m.modality: wrapped.get_submodule("base_model.model." + m.name).r["default"] for m in plan.modules}
    if isinstance(method, dict):  # width = output size / 4, whatever r says
        assert len({m.r for m in plan.modules}) == 3 and sizes["language"] == model.config.text_config.hidden_size // 4
    else:
        assert sizes == {"vision": 2, "projector": 4, "language": 8}
    layer = next(m for m in wrapped.modules() if isinstance(m, (BottleneckLinear, MoeLoraLinear)))
    layer.r["default"] += 1  # a layer that differs from the plan is caught
    with pytest.raises(Exception, match="wrong rank"):
        from mmtuning_plugin.targets import verify_wrapped
        verify_wrapped(wrapped, plan)


# --- MoE-LoRA ------------------------------------------------------------------------------------------


def test_moe_lora_routes_image_tokens_by_their_positions_and_text_tokens_by_the_text_router():
    model = tiny_model("llava")
    wrapped = MMTuning({"method": "moe-lora", "vision": True, "r": 4}).wrap(model)
    language = wrapped.base_model.model.model.language_model.layers[0].self_attn.q_proj
    vision = wrapped.base_model.model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert isinstance(language, MoeLoraLinear) and not language.all_image and vision.all_image
    with torch.no_grad():  # the image router picks expert 1 everywhere, the text router expert 2
        for layer in moe_layers(wrapped):
            layer.moelora_router_image["default"].bias.copy_(torch.tensor([0.0, 9.0, 0.0, 0.0]))
            layer.moelora_router_text["default"].bias.copy_(torch.tensor([0.0, 0.0, 9.0, 0.0]))
            layer.moelora_router_image["default"].weight.zero_()
            layer.moelora_router_text["default"].weight.zero_()
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = module.gates("default", args[0]).argmax(-1)
        return hook

    language.register_forward_hook(record("language"))
    vision.register_forward_hook(record("vision"))
    batch = tiny_batch(model)
    ids = batch.inputs["input_ids"].clone()
    image_id = model.config.image_token_id
    for shift in (0, 3):  # images moved further into the row: routing follows the placeholders, not a position
        inputs = dict(batch.inputs, input_ids=torch.roll(ids, shift, dims=1))
        with torch.no_grad():
            wrapped(**inputs)
        image = inputs["input_ids"] == image_id
        assert image.any() and (~image).any()
        assert torch.equal(seen["language"][image], torch.ones_like(seen["language"][image]))
        assert torch.equal(seen["language"][~image], torch.full_like(seen["language"][~image], 2))
        assert bool((seen["vision"] == 1).all())


def test_load_balance_is_one_when_balanced_and_the_expert_count_when_one_expert_takes_all():
    assert load_balance(torch.full((6, 4), 0.25)).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balance(torch.tensor([[1.0, 0, 0, 0]] * 5)).item() == pytest.approx(4.0)


def test_moe_lora_trains_with_keep_a_schedule_and_its_balance_term_on_a_4bit_base(tmp_path):
    processor = load_processor(MODEL_DIR)
    rows = encode(processor, make_set("target", "train", 16, seed=5))
    block = {"method": {"name": "moe-lora", "experts": 3, "balance": 0.05}, "r": 4, "quant": "balanced",
             "vision": {"modules": "attention", "layers": {"top": 2},
                        "schedule": {"type": "top_down", "start": 1, "every": 0.5}},
             "language": {"modules": "attention"},
             "keep": {"prompts": PROMPTS, "ramp": 0}}
    session = MMTuning(block)
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=True))
    before = trainable(model)
    second = min(session.require_plan().layers["vision"])  # top-down: the top layer trains first, this one later
    lowest = f"base_model.model.model.vision_tower.encoder.layers.{second}."
    trainer = MMTuningTrainer(model=model, args=arguments(tmp_path, max_steps=4, per_device_train_batch_size=4),
                              train_dataset=rows, mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    frozen_at_start = {}

    class Watch(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                frozen_at_start.update({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(lowest)
                                        and ".moelora_" in n})

    trainer.add_callback(Watch())
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss_align/moe_balance" in e]
    assert len(logged) == 4 and all(e["loss_align/moe_balance"] > 0 for e in logged)
    assert all(e["loss_keep"] > 0 for e in trainer.state.log_history if "loss_keep" in e)
    after = trainer.model.named_parameters()
    moved = {n for n, p in after if n in before and not torch.equal(p.detach(), before[n])}
    for part in ("moelora_A", "moelora_B", "moelora_router_image", "moelora_router_text"):
        assert any(part in n and ".language_model." in n for n in moved), part
    assert any(".vision_tower." in n and "moelora_B" in n for n in moved)
    assert not any(".vision_tower." in n and "router_text" in n for n in moved)  # the tower sees image tokens only
    assert frozen_at_start and all(torch.equal(frozen_at_start[n], before[n]) for n in frozen_at_start)  # stage 1
    b = dict(model.named_parameters())["base_model.model.model.language_model.layers.0.self_attn.q_proj.moelora_B.default"]
    assert not torch.allclose(b[0], b[1])  # experts specialise


# --- saving, reloading, scoring, converting ---------------------------------------------------------------


CASES = {  # name -> (builder, batch builder, block)
    "llava-adapter": ("llava", {"method": "adapter", "vision": True, "r": 4}),
    "llava-moe": ("llava", {"method": "moe-lora", "vision": True, "r": 4}),
    "qwen2_vl-adapter": ("qwen2_vl", {"method": {"name": "adapter", "reduction": 4}, "vision": True}),
    "qwen2_vl-moe": ("qwen2_vl", {"method": {"name": "moe-lora", "experts": 3}, "vision": True, "r": 4}),
    "blip-2-adapter": ("blip-2", {"method": "adapter", "vision": True, "r": 4}),
    "blip-2-moe": ("blip-2", {"method": "moe-lora", "vision": True, "r": 4}),
}
RELOAD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from mmtuning_plugin.methods import register_peft_methods

    register_peft_methods()
    for case in sys.argv[1:]:
        root = Path(case)
        base = AutoModelForImageTextToText.from_pretrained(root / "base", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(root / "adapter")).eval()
        with torch.no_grad():
            torch.save(model(**torch.load(root / "inputs.pt")).logits, root / "reloaded.pt")
""")


def build(model_type):
    if model_type == "blip-2":
        model = tiny_family_model("blip-2", "opt")
        return model, tiny_family_batch(model).inputs
    model = tiny_model(model_type)
    return model, tiny_batch(model).inputs


def test_both_methods_train_save_and_reload_in_a_fresh_process_with_identical_logits(tmp_path):
    cases = []
    for name, (model_type, block) in CASES.items():
        root = tmp_path / name
        model, inputs = build(model_type)
        model.save_pretrained(root / "base")
        session = MMTuning(block)
        wrapped = session.wrap(model)
        before = trainable(wrapped)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        wrapped.train()
        for _ in range(3):  # Qwen2-VL's patches of all rows come in one tensor: a plain loop, not row datasets
            wrapped(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        moved = [n for n, p in wrapped.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
        assert moved, name
        modalities = {session.require_plan().modality_of(m) for m in {n.split(".bottleneck_")[0].split(".moelora_")[0]
                                                                        .removeprefix("base_model.model.") for n in moved}}
        assert modalities >= {"vision", "language"}, (name, modalities)
        wrapped.eval()
        with torch.no_grad():
            logits = wrapped(**inputs).logits
            with adapters_disabled(wrapped):
                assert not torch.allclose(wrapped(**inputs).logits, logits), name  # the adapter changes the output
        wrapped.save_pretrained(root / "adapter")
        torch.save(inputs, root / "inputs.pt")
        torch.save(logits, root / "logits.pt")
        cases.append(str(root))
    subprocess.run([sys.executable, "-c", RELOAD, *cases], check=True, timeout=600)
    for case in cases:
        assert torch.equal(torch.load(Path(case) / "reloaded.pt"), torch.load(Path(case) / "logits.pt")), case


@pytest.fixture(scope="module")
def moe_adapter(tmp_path_factory):
    """A moe-lora adapter of the demo model with its experts moved off zero, saved."""
    root = tmp_path_factory.mktemp("moe")
    session = MMTuning({"method": "moe-lora", "language": {"modules": "attention"}})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "moelora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(root / "adapter"))
    return root / "adapter"


def test_moe_lora_reloads_onto_a_4bit_base_with_identical_logits(moe_adapter):
    from peft import PeftModel

    from mmtuning_plugin.evaluate import load_adapter_model

    model, processor, _ = load_adapter_model(moe_adapter, None, four_bit=True)
    again, _, _ = load_adapter_model(moe_adapter, None, four_bit=True)
    rows = encode(processor, make_set("target", "eval", 2, seed=1))
    batch = training_batch(rows, processor.tokenizer.pad_token_id)
    model.eval(), again.eval()
    with torch.no_grad(), cpu_4bit_repack_off(model), cpu_4bit_repack_off(again):
        first, second = model(**batch).logits, again(**batch).logits
        with adapters_disabled(model):
            base = model(**batch).logits
    assert isinstance(model, PeftModel) and torch.equal(first, second) and not torch.allclose(first, base)


def test_mmtune_eval_scores_a_moe_lora_adapter(moe_adapter, tmp_path):
    from test_eval import write_set

    target, general = write_set(tmp_path, "target", 4), write_set(tmp_path, "general", 4)
    result = runner.invoke(app, ["eval", str(moe_adapter), "--target", str(target), "--general", str(general), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"E", "F", "O"} <= set(report)
    assert report["sets"]["general"]["after_answers"] != report["sets"]["general"]["before_answers"]


@pytest.mark.parametrize("command", [["merge", "--base", str(MODEL_DIR), "--out", "OUT"], ["resize", "--rank", "4", "--out", "OUT"],
                                     ["export", "--for", "vllm", "--base", str(MODEL_DIR), "--out", "OUT"]])
def test_convert_refuses_moe_lora_with_the_reason(moe_adapter, tmp_path, command):
    command = [str(tmp_path / "out") if part == "OUT" else part for part in command]
    result = runner.invoke(app, ["convert", command[0], str(moe_adapter), *command[1:]])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "method: moe-lora" in text and "no single LoRA delta" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()
