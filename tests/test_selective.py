"""Selective tuning on tiny real models: what trains equals the plan (by hand, per architecture), the planned
tensors move and nothing else does after Trainer steps, the saved adapter reloads them, schedules freeze them,
4-bit modules are refused, and SPIDER's mask lets through at most its ratio."""

import json
import math

import pytest
import torch
from transformers import TrainingArguments
from typer.testing import CliRunner

from mmtuning_plugin.cli import app
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
from mmtuning_plugin.selective.spider import importance_mask
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

COPY = ".modules_to_save.default."
# Tiny LLaVA: vision reads layer -2 of 4, so `top: 1` is vision layer 2; the language model (Llama) has no biases.
VISION_2 = "model.vision_tower.encoder.layers.2."
LANGUAGE = "model.language_model.layers."
MIXED = {"vision": {"layers": {"top": 1}, "selective": "bias"},
         "projector": {"selective": "full"},
         "language": {"layers": {"top": 2}, "selective": "layernorm"}}
EXPECTED_TRAINED = sorted(
    [VISION_2 + m + ".bias" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                      "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")]
    + [f"model.multi_modal_projector.linear_{i}.{t}" for i in (1, 2) for t in ("weight", "bias")]
    + [f"{LANGUAGE}{i}.{n}.weight" for i in (2, 3) for n in ("input_layernorm", "post_attention_layernorm")])


def plain(name: str) -> str:
    """A wrapped parameter's name in the base model (`...q_proj.modules_to_save.default.bias` -> `...q_proj.bias`)."""
    return name.removeprefix("base_model.model.").replace(COPY, ".").replace(".original_module.", ".")


def trainer_for(model, session, tmp_path, steps, **extra):
    batch = tiny_batch(model.get_base_model(), batch=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False, **extra)
    return MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, 8),
                           data_collator=stack_rows, mmtuning=session)


def test_selective_trains_exactly_the_plan_moves_only_it_and_round_trips(tmp_path):
    from peft import PeftModel

    model, session = prepare_model(tiny_model("llava"), MIXED)
    trainable = sorted(plain(n) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == EXPECTED_TRAINED
    assert session.plan.trainable_params() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = trainer_for(model, session, tmp_path, steps=3)
    trainer.train()

    assert sorted(g["name"] for g in trainer.optimizer.param_groups) == ["language", "projector", "vision"]
    moved = sorted(plain(n) for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))
    assert moved == EXPECTED_TRAINED  # bias-only copies keep their weights; originals and the rest stay put
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("q_proj" + COPY + "weight"))

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model("llava"), tmp_path / "adapter")
    trained = {plain(n): p for n, p in model.named_parameters() if COPY in n}
    loaded = {plain(n): p for n, p in reloaded.named_parameters() if COPY in n}
    assert sorted(loaded) == sorted(trained)
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)
    inputs = tiny_batch(tiny_model("llava"), batch=1).inputs
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reloaded(**inputs).logits)


def test_qwen_bias_tuning_trains_the_language_biases_it_has(tmp_path):
    """Qwen2 has q/k/v biases only: `bias` on its top language layer trains exactly those three."""
    model, session = prepare_model(tiny_model("qwen2_vl"), {"language": {"layers": {"top": 1}, "selective": "bias"},
                                                            "projector": False})
    top = session.plan.layers["language"][-1]
    trainable = sorted(plain(n) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.language_model.layers.{top}.self_attn.{m}_proj.bias" for m in "kqv"]


def test_a_schedule_freezes_and_releases_selected_layers(tmp_path):
    config = {"vision": False, "projector": False,
              "language": {"layers": {"top": 2}, "selective": "full",
                           "schedule": {"type": "custom", "stages": [{"at": 0, "layers": [3]}, {"at": 2, "layers": [2, 3]}]}}}
    model, session = prepare_model(tiny_model("llava"), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if COPY in n}
    trainer = trainer_for(model, session, tmp_path, steps=2)
    trainer.train()
    moved = {plain(n) for n, p in model.named_parameters() if COPY in n and not torch.equal(p.detach(), before[n])}
    assert moved and all(n.startswith(LANGUAGE + "3.") for n in moved)  # layer 2's stage starts after the last step
    assert {n.split(".")[3] for n in map(plain, before)} == {"2", "3"}
    assert all(p.requires_grad for n, p in model.named_parameters() if COPY in n)  # restored after training


def test_spider_mask_follows_importance_and_caps_at_its_ratio():
    accumulated = torch.tensor([1.0, 4.0, 2.0, 0.0])  # task importance: 0.25, 1, 0.5, 0
    pretrained = torch.tensor([0.1, 1.0, -0.2, 0.5])  # general importance: 0.1, 1, 0.2, 0.5
    assert importance_mask(accumulated, pretrained, 1.0).tolist() == [True, False, True, False]
    # excess 0.15 and 0.3: a cap of one weight keeps the larger excess
    assert importance_mask(accumulated, pretrained, 0.25).tolist() == [False, False, True, False]


def test_spider_moves_at_most_its_ratio_per_step_and_logs_it(tmp_path):
    ratio = 0.05
    model, session = prepare_model(tiny_model("llava"), {
        "vision": False, "projector": False,
        "language": {"layers": {"top": 1}, "selective": {"method": "spider", "mask_ratio": ratio}}})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if COPY in n}
    trainer = trainer_for(model, session, tmp_path, steps=1)
    trainer.train()
    moved = {n: (int((p.detach() != before[n]).sum()), p.numel()) for n, p in model.named_parameters() if COPY in n}
    linears = [pair for n, pair in moved.items() if "_proj" in n]
    assert len(moved) == 9 and len(linears) == 7  # and the two norms of the layer, whose weights are all 1:
    assert all(0 < count <= math.ceil(ratio * size) for count, size in linears)  # never below general importance
    assert all(count == 0 for n, (count, _) in moved.items() if "layernorm" in n)
    logged = [e["mmtuning_spider_mask_ratio/language"] for e in trainer.state.log_history
              if "mmtuning_spider_mask_ratio/language" in e]
    total = sum(size for _, size in moved.values())
    assert len(logged) == 1 and logged[0] == pytest.approx(sum(count for count, _ in moved.values()) / total)


@pytest.fixture(scope="module")
def llava_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_model("llava", dtype=torch.bfloat16).save_pretrained(path)
    return path


def test_4bit_modules_are_refused_whole_but_layernorm_trains_beside_them(llava_bf16):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    def load():
        return AutoModelForImageTextToText.from_pretrained(
            llava_bf16, dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))

    for modality, method in (("language", "full"), ("language", "spider"), ("vision", "bias")):
        with pytest.raises(MMTuningError, match=rf"load quantized.*quant: \{{{modality}: none\}}.*keep_16bit"):
            MMTuning({modality: {"layers": {"top": 1}, "selective": method}, "projector": False}).wrap(load())
    session = MMTuning({"language": {"layers": {"top": 1}, "selective": "layernorm"}, "projector": False})
    model = session.wrap(load())
    norms = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(map(plain, norms)) == [f"{LANGUAGE}3.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    before = {n: p.detach().clone() for n, p in norms.items()}
    optimizer = torch.optim.AdamW(list(norms.values()), lr=1e-2)
    model.train()
    model(**tiny_batch(model.get_base_model(), batch=1).inputs).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in norms.items())


def test_inspect_targets_reports_trainable_bytes_optimizer_state_and_spider_memory():
    result = CliRunner().invoke(app, ["inspect-targets", "llava", "--json", "--set", "vision.layers=top:2",
                                      "--set", "language.layers=top:1",
                                      "--set", "language.selective={method: spider, mask_ratio: 0.1}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    language, vision = report["modalities"]["language"], report["modalities"]["vision"]
    # Llama-7B shape (the llava default config): 4 attention 4096x4096 + 3 MLP 4096x11008 + 2 norms in the top layer
    trained = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert language["trainable_params"] == trained == language["selective"]["trained_params"]
    assert language["optimizer_state_bytes"] == 8 * trained and language["trainable_bytes"] == 8 * trained
    assert language["selective"]["extra_state_bytes"] == 8 * trained and language["selective"]["mask_ratio"] == 0.1
    assert vision["selective"] is None and vision["optimizer_state_bytes"] == 8 * vision["trainable_params"] > 0
    assert report["plan"]["selective"] == {"language": "spider"}
    table = CliRunner().invoke(app, ["inspect-targets", "llava", "--set", "language.layers=top:1",
                                     "--set", "language.selective=spider"])
    text = " ".join(table.output.split())
    assert "language: selective spider on 9 modules" in text and "mask state 1.51 GiB" in text


def test_verify_refuses_a_selected_module_whose_original_or_planned_tensor_changed_state():
    from mmtuning_plugin.errors import PlanMismatchError

    model, session = prepare_model(tiny_model("llava"), MIXED)
    original = model.base_model.model.model.multi_modal_projector.linear_1.original_module.weight
    original.requires_grad_(True)  # e.g. a host unfreezing base weights by name
    with pytest.raises(PlanMismatchError, match=r"train but the selective plan keeps frozen.*linear_1.weight \(the original"):
        session.verify(model)
    original.requires_grad_(False)
    norm = model.base_model.model.model.language_model.layers[3].input_layernorm.modules_to_save["default"].weight
    norm.requires_grad_(False)
    with pytest.raises(PlanMismatchError, match=r"selected tensors that do not train.*layers.3.input_layernorm.weight"):
        session.verify(model)
    norm.requires_grad_(True)
    session.verify(model)


def test_spider_steps_are_deterministic_and_leave_masked_weights_exactly_in_place():
    from mmtuning_plugin.selective.spider import MaskedTensor, SpiderMask

    def run():
        torch.manual_seed(0)
        original = torch.nn.Linear(16, 16)
        copy = torch.nn.Linear(16, 16)
        copy.load_state_dict(original.state_dict())
        spider = SpiderMask([MaskedTensor("w", "language", copy.weight, original.weight.detach(), 0.25)])
        optimizer = torch.optim.AdamW([copy.weight], lr=1e-2, weight_decay=0.1)
        for step in range(3):
            before = copy.weight.detach().clone()
            copy(torch.randn(4, 16)).pow(2).sum().backward()
            spider.before_step()
            mask = spider.tensors[0].mask
            optimizer.step()
            spider.after_step()
            optimizer.zero_grad()
            changed = copy.weight.detach() != before
            assert not changed[~mask].any() and int(mask.sum()) <= 64  # a quarter of 256 at most
        return copy.weight.detach().clone(), spider.applied["language"]

    (first, ratios), (second, again) = run(), run()
    assert torch.equal(first, second) and ratios == again and all(0 < r <= 0.25 for r in ratios)
