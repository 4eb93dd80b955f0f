"""Target plans: PEFT wraps exactly the plan, only adapters train, and bad specs fail loudly."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mmtuning_plugin.errors import MMTuningError, PlanMismatchError
from mmtuning_plugin.targets import apply_plan, plan_targets, verify_wrapped, wrapped_set
from mmtuning_plugin.testing.tiny import TINY_MODEL_TYPES, tiny_batch, tiny_model

SPEC = {
    "vision": {"modules": "attention", "layers": {"top": 2}, "r": 4},
    "projector": {"r": 8},
    "language": {"modules": "all-linear"},
}


def lora_module_names(peft_model):
    """Independent of mmtuning: names of modules that own a lora_A, relative to the base model."""
    names = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            name = name.removeprefix("base_model.model.")
            names.add(name)
    return names


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_peft_wraps_exactly_the_plan_and_only_adapters_get_gradients(model_type):
    model = tiny_model(model_type)
    plan = plan_targets(model, SPEC)
    batch = tiny_batch(model)
    peft_model = apply_plan(model, plan)

    wrapped = lora_module_names(peft_model)
    planned = set(plan.target_modules) | {p.rsplit(".", 1)[0] for p in plan.target_parameters}
    assert wrapped == planned
    assert {m.modality for m in plan.modules} | {p.modality for p in plan.parameters} == {"vision", "projector", "language"}
    # mllama: 4 local + 2 global vision layers; LLaVA(-NeXT) read vision layer -2, so layer 3 is unused
    top_two = {"mllama": [4, 5], "llava": [1, 2], "llava_next": [1, 2]}.get(model_type, [2, 3])
    assert plan.layers["vision"] == top_two
    assert all(m.leaf.kind == "attention" and m.leaf.layer in top_two for m in plan.modules_of("vision"))

    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(peft_model.get_nb_trainable_parameters()[:1]) == plan.trainable_params()

    peft_model.train()
    loss = peft_model(**batch.inputs).loss
    loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    moved = {modality: False for modality in ("vision", "projector", "language")}
    for name, param in peft_model.named_parameters():
        if "lora_B" in name and param.grad is not None and param.grad.abs().sum() > 0:
            module = name.removeprefix("base_model.model.").split(".lora_B")[0]
            moved[plan.modality_of(module) or plan.modality_of(module + ".mm_input_projection_weight")] = True
    assert moved == {"vision": True, "projector": True, "language": True}


def test_every_selected_vision_layer_gets_a_gradient_when_the_model_skips_its_last_layer():
    """LLaVA reads vision_feature_layer -2: selections count only the layers whose output is used."""
    model = tiny_model("llava")
    plan = plan_targets(model, {"vision": {"layers": {"top": 2}}, "projector": False, "language": False})
    assert plan.layout.usable_layers["vision"] == 3 and plan.layers["vision"] == [1, 2]
    peft_model = apply_plan(model, plan)
    peft_model.train()
    peft_model(**tiny_batch(model).inputs).loss.backward()
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_an_optimizer_step_moves_adapters_and_leaves_base_weights_bit_identical():
    model = tiny_model("qwen2_vl")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = tiny_batch(model)
    peft_model = apply_plan(model, plan_targets(model, SPEC))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(**batch.inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in peft_model.named_parameters():
        base = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if base in before:
            assert torch.equal(param, before[base]), name
    assert any((p != 0).any() for n, p in peft_model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", [0, 1, 2, 3]),
        ({"top": 1}, [3]),
        ("top:3", [1, 2, 3]),
        ({"bottom": 2}, [0, 1]),
        ({"fraction": 0.5}, [2, 3]),
        ({"fraction": 0.3}, [2, 3]),  # ceil(0.3 * 4) = 2
        ([0, "2-3"], [0, 2, 3]),
        ("0,2", [0, 2]),
        ([-1], [3]),
    ],
)
def test_layer_selections(layers, expected):
    plan = plan_targets(tiny_model("llava"), {"language": {"layers": layers}, "projector": False})
    assert plan.layers["language"] == expected
    assert sorted({m.leaf.layer for m in plan.modules}) == expected


def test_per_modality_rank_and_alpha_reach_peft():
    model = tiny_model("llava")
    plan = plan_targets(model, {"r": 16, "alpha": 32, "vision": {"r": 4}, "projector": {"r": 8, "alpha": 64}})
    peft_model = apply_plan(model, plan)
    found = wrapped_set(peft_model)
    for planned in plan.modules:
        assert found.modules[planned.name] == planned.r
    scaling = {}
    for name, module in peft_model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            scaling[name.removeprefix("base_model.model.")] = module.scaling["default"]
    vision_q = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    assert found.modules[vision_q] == 4 and scaling[vision_q] == pytest.approx(8 / 4)  # alpha keeps 32/16
    assert scaling["model.multi_modal_projector.linear_1"] == pytest.approx(64 / 8)
    assert scaling["model.language_model.layers.0.mlp.up_proj"] == pytest.approx(2.0)


def test_explicit_leaf_names_select_only_those():
    plan = plan_targets(tiny_model("qwen2_5_vl"), {"vision": {"modules": ["attn.qkv", "down_proj"]},
                                                   "language": {"modules": ["q_proj", "v_proj"]}, "projector": False})
    assert {m.leaf.local for m in plan.modules_of("vision")} == {"attn.qkv", "mlp.down_proj"}
    assert {m.leaf.local for m in plan.modules_of("language")} == {"self_attn.q_proj", "self_attn.v_proj"}


def test_projector_is_targeted_by_default_and_vision_is_not():
    plan = plan_targets(tiny_model("llava"), {})
    assert plan.modules_of("projector") and not plan.modules_of("vision")


def test_gemma3_bare_projector_weight_goes_through_target_parameters():
    model = tiny_model("gemma3")
    plan = plan_targets(model, {})
    assert plan.target_parameters == ["model.multi_modal_projector.mm_input_projection_weight"]
    assert plan.dropout == 0.0  # PEFT's ParamWrapper has no dropout
    peft_model = apply_plan(model, plan)
    assert wrapped_set(peft_model).parameters == {"model.multi_modal_projector.mm_input_projection_weight": 16}
    with pytest.raises(MMTuningError, match="dropout"):
        plan_targets(tiny_model("gemma3"), {"dropout": 0.1})


def test_projector_full_trains_it_whole():
    model = tiny_model("gemma3")
    plan = plan_targets(model, {"projector": {"full": True}})
    peft_model = apply_plan(model, plan)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector.modules_to_save" in n and "mm_input_projection_weight" in n for n in trainable)
    assert plan.trainable_params() == sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)


def test_patch_embed_lm_head_and_embeddings_only_when_asked():
    default = plan_targets(tiny_model("qwen2_vl"), {"vision": {}})
    kinds = {m.leaf.kind for m in default.modules}
    assert not kinds & {"patch_embed", "lm_head", "embed_tokens"}
    model = tiny_model("qwen2_vl")
    asked = plan_targets(model, {"vision": {"include": ["patch_embed"]}, "language": {"include": ["lm_head", "embed_tokens"]}})
    names = set(asked.target_modules)
    assert {"model.visual.patch_embed.proj", "lm_head", "model.language_model.embed_tokens"} <= names
    peft_model = apply_plan(model, asked)  # Conv3d and Embedding LoRA, verified
    assert peft_model.get_nb_trainable_parameters()[0] == asked.trainable_params()


@pytest.mark.parametrize("method, extra", [("lora", {"use_dora": True}), ("lora", {"use_rslora": True}),
                                           ("ia3", {}), ("loha", {}), ("lokr", {})])
def test_other_adapter_methods_wrap_exactly_the_plan(method, extra):
    model = tiny_model("idefics3")
    plan = plan_targets(model, {**SPEC, "method": method, **extra})
    peft_model = apply_plan(model, plan)
    assert set(wrapped_set(peft_model).modules) == set(plan.target_modules)
    if plan.trainable_params() is not None:
        assert plan.trainable_params() == peft_model.get_nb_trainable_parameters()[0]


def test_verification_catches_a_suffix_target_that_also_hits_the_vision_tower():
    model = tiny_model("llava")
    plan = plan_targets(model, {"projector": False, "language": {"modules": ["q_proj"]}})
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"]))
    with pytest.raises(PlanMismatchError, match="did not ask for: model.vision_tower.encoder.layers.0.self_attn.q_proj"):
        verify_wrapped(peft_model, plan)


def test_verification_catches_a_missing_module_and_a_wrong_rank():
    model = tiny_model("llava")
    plan = plan_targets(model, {"projector": False, "language": {"modules": ["q_proj"], "r": 4}})
    partial = LoraConfig(r=8, target_modules=plan.target_modules[1:])
    with pytest.raises(PlanMismatchError) as info:
        verify_wrapped(get_peft_model(model, partial), plan)
    assert "without an adapter: model.language_model.layers.0.self_attn.q_proj" in str(info.value)
    assert "wrong rank" in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"language": {"layers": {"top": 9}}}, "mmtuning.language.layers: asks for top 9 layers but there are only 4"),
        ({"vision": {"layers": {"top": 4}}}, "only 3 (0-2 usable; the last 1 never reach the language model)"),
        ({"vision": {"layers": [3]}}, "layers [3] come after the vision layer this model reads its features from"),
        ({"language": {"layers": [7]}}, "mmtuning.language.layers: layer indices [7] do not exist"),
        ({"vision": {"modules": ["wq"]}}, "mmtuning.vision.modules: 'wq' matches no module"),
        ({"projector": {"modules": "attention"}}, "mmtuning.projector.modules: 'attention' selects no module"),
        ({"projector": {"layers": {"top": 1}}}, "the projector has no numbered layers"),
        ({"vision": {"include": ["lm_head"]}}, "do not belong to vision"),
        ({"method": "ia3", "language": {"include": ["embed_tokens"]}}, "ia3 cannot adapt Embedding"),
        ({"vision": False, "projector": False, "language": False}, "every modality is disabled"),
    ],
)
def test_specs_that_select_nothing_or_wrong_things_are_errors_naming_the_key(spec, message):
    with pytest.raises(MMTuningError) as info:
        plan_targets(tiny_model("llava"), spec)
    assert message in str(info.value)
