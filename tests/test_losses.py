"""Alignment losses on tiny real models: finite, gradients only where trainable, zero where they should be,
and each one alone moves its value the right way over a few optimizer steps."""

import math
import warnings

import pytest
import torch

from mmtuning_plugin import plugins
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.losses import LossSuite, registered_losses, validate_losses
from mmtuning_plugin.losses.capture import FeatureCapture
from mmtuning_plugin.session import MMTuning
from helpers import perturb_lora_b
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model

ARCHS = ("llava", "qwen2_vl", "idefics3")
LOSSES = {
    "anchor": {"weight": 1.0},
    "contrastive": {"weight": 1.0},
    "sculpt": {"weight": 1.0},
    "multiscale": {"weight": 1.0, "of": "anchor", "layers": [-1, -2]},
}
TARGETS = {"vision": {"layers": {"top": 2}}, "dropout": 0.0}


def session_for(model_type, losses, batch=3, **config):
    model = tiny_model(model_type)
    inputs = tiny_batch(model, batch=batch).inputs
    session = MMTuning({**TARGETS, **config, "losses": losses})
    wrapped = session.wrap(model)
    wrapped.train()
    return wrapped, session, inputs


def loss_terms(model, session, inputs):
    outputs = model(**inputs)
    return outputs, session.extra_losses(model, inputs, outputs)


@pytest.mark.parametrize("model_type", ARCHS + ("gemma3",))  # gemma3: bare projector weight (PEFT ParamWrapper)
def test_anchor_and_sculpt_are_zero_at_initialisation_with_zero_lora_b(model_type):
    model, session, inputs = session_for(model_type, {"anchor": {"weight": 1.0, "metric": "mse"}, "sculpt": {"weight": 1.0},
                                                      "multiscale": {"weight": 1.0, "layers": [-1]}})
    _, terms = loss_terms(model, session, inputs)
    assert terms["loss_align/anchor"].item() == 0.0
    assert terms["loss_align/sculpt"].item() == 0.0
    assert terms["loss_align/multiscale"].item() < 1e-6  # cosine of identical vectors, up to rounding
    assert any("multi_modal_projector" in n or "merger" in n or "connector" in n
               for n in model.mmtuning_losses["sculpt"].layer_names)
    sum(terms.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    perturb_lora_b(model)
    _, terms = loss_terms(model, session, inputs)
    assert all(v.item() > 0 for v in terms.values())


def check_first_step(model, value):
    """Finite scalar; after backward, gradients exist only on trainable parameters, finite, not all zero."""
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    with_grad = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(p.requires_grad for p in with_grad.values())
    assert all(torch.isfinite(p.grad).all() for p in with_grad.values())
    assert any(p.grad.abs().sum() > 0 for p in with_grad.values())


def optimise_alone(model, session, inputs, key, steps=5, lr=0.02):
    """Adam on `key` alone; returns its first and final value. The first step is checked by check_first_step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    values = []
    for step in range(steps):
        optimizer.zero_grad()
        _, terms = loss_terms(model, session, inputs)
        assert list(terms) == [key]
        values.append(terms[key].item())
        if step == 0:
            check_first_step(model, terms[key])
        else:
            terms[key].backward()
        optimizer.step()
    with torch.no_grad():
        _, terms = loss_terms(model, session, inputs)
    return values[0], terms[key].item()


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_each_loss_alone_is_finite_trains_only_adapters_and_goes_down(model_type, loss_name):
    model, session, inputs = session_for(model_type, {loss_name: LOSSES[loss_name]}, batch=4)
    perturb_lora_b(model)
    first, last = optimise_alone(model, session, inputs, f"loss_align/{loss_name}")
    assert last < 0.8 * first, (first, last)


def test_multiscale_contrastive_reads_chosen_language_layers_and_goes_down():
    model, session, inputs = session_for("qwen2_vl", {"multiscale": {
        "weight": 1.0, "of": "contrastive", "layers": [1, -1], "temperature": 1.0, "learnable_temperature": False}}, batch=4)
    assert sorted(session.losses.capture._points) == ["language_layer.1", "language_layer.3"]
    first, last = optimise_alone(model, session, inputs, "loss_align/multiscale", lr=0.01)
    assert last < 0.95 * first, (first, last)


def test_contrastive_with_one_sample_is_skipped_with_one_warning():
    model, session, inputs = session_for("llava", {"contrastive": {}}, batch=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _, terms = loss_terms(model, session, inputs)
            assert terms == {}
    assert len([w for w in caught if "at least 2" in str(w.message)]) == 1


def test_contrastive_temperature_learnable_or_fixed():
    model, session, inputs = session_for("llava", {"contrastive": {"temperature": 0.1}})
    scale = model.mmtuning_losses["contrastive"].logit_scale
    assert isinstance(scale, torch.nn.Parameter) and math.isclose(scale.item(), math.log(10), rel_tol=1e-6)
    _, terms = loss_terms(model, session, inputs)
    terms["loss_align/contrastive"].backward()
    assert scale.grad is not None and scale.grad.item() != 0
    assert any(n.endswith("logit_scale") for n, p in model.named_parameters() if p.requires_grad)

    fixed, _, _ = session_for("llava", {"contrastive": {"learnable_temperature": False}})
    assert not any(n.endswith("logit_scale") for n, _ in fixed.named_parameters())


def test_warmup_ramps_the_weight_from_zero():
    model, session, inputs = session_for("llava", {"anchor": {"weight": 2.0, "warmup_steps": 10}})
    perturb_lora_b(model)
    session.losses.step = 0
    assert loss_terms(model, session, inputs)[1] == {}
    session.losses.step = 5
    half = loss_terms(model, session, inputs)[1]["loss_align/anchor"].item()
    session.losses.step = 20
    full = loss_terms(model, session, inputs)[1]["loss_align/anchor"].item()
    assert math.isclose(full, 2 * half, rel_tol=1e-5)


def test_sculpt_sparsifies_lora_a_and_b_from_the_given_step():
    model, session, inputs = session_for("llava", {"sculpt": {"weight": 1e-3, "sparsify_from": 2, "keep": 0.25}})
    perturb_lora_b(model)
    sculpt = model.mmtuning_losses["sculpt"]
    names = sculpt.layer_names
    assert names and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") or "multi_modal_projector" in n
                         for n in names)
    assert any("multi_modal_projector" in n for n in names) and any("vision_tower" in n for n in names)

    def nonzero_shares():
        return [(layer.lora_A[a].weight != 0).float().mean().item() for _, layer, a in sculpt._layers] + \
               [(layer.lora_B[a].weight != 0).float().mean().item() for _, layer, a in sculpt._layers]

    session.losses.step_end(1)
    assert min(nonzero_shares()) > 0.9
    session.losses.step_end(2)
    assert max(nonzero_shares()) <= 0.26
    with torch.no_grad():  # an optimizer step refills the pruned entries; the next step end prunes them again
        for _, layer, a in sculpt._layers:
            layer.lora_A[a].weight.add_(0.01)
    session.losses.step_end(3)
    assert max(nonzero_shares()) <= 0.26


def test_sculpt_mask_follows_the_formula_on_the_frozen_weight():
    model, session, _ = session_for("llava", {"sculpt": {"weight": 1e-3, "w": 2.0}})
    sculpt = model.mmtuning_losses["sculpt"]
    name, layer, _ = sculpt._layers[0]
    weight = layer.get_base_layer().weight.detach()
    expected = torch.tanh(2.0 * (1 / torch.log((weight / weight.norm()).abs() + 1e-8)).abs())
    assert torch.allclose(sculpt._masks[0], expected)
    assert 0 < sculpt._masks[0].min() and sculpt._masks[0].max() < 1
    perturb_lora_b(model)
    reference = []  # the formula layer by layer: lambda-free mean of ||M * (B @ A * scaling)||_F
    for (_, layer, adapter), mask in zip(sculpt._layers, sculpt._masks):
        delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]
        reference.append(torch.linalg.vector_norm(mask * delta))
    assert len(sculpt._groups) < len(sculpt._layers)  # batched by shape
    assert torch.allclose(sculpt(None), torch.stack(reference).mean(), rtol=1e-5)


def test_config_errors_name_the_key_and_list_registered_losses():
    with pytest.raises(MMTuningError) as unknown:
        MMTuning({"losses": {"anchr": {}}})
    text = str(unknown.value)
    assert "mmtuning.losses" in text and "unknown loss 'anchr'" in text
    assert "anchor, contrastive, moe_balance, multiscale, sculpt" in text
    with pytest.raises(MMTuningError, match=r"anchor.metric"):
        MMTuning({"losses": {"anchor": {"metric": "l1"}}})
    with pytest.raises(MMTuningError, match=r"contrastive.temprature: unknown option"):
        MMTuning({"losses": {"contrastive": {"temprature": 0.1}}})
    with pytest.raises(MMTuningError, match=r"no-op"):
        MMTuning({"losses": {"anchor": {"weight": 0}}})
    assert validate_losses({"sculpt": {"weight": 0, "sparsify_from": 5}})["sculpt"].weight == 0


def test_losses_that_cannot_apply_raise_clear_errors():
    with pytest.raises(MMTuningError, match="cross-attention"):
        session_for("mllama", {"contrastive": {}})
    model, session, inputs = session_for("mllama", {"anchor": {}, "sculpt": {}})
    perturb_lora_b(model)
    _, terms = loss_terms(model, session, inputs)
    assert set(terms) == {"loss_align/anchor", "loss_align/sculpt"} and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(MMTuningError, match="no adapters"):
        session_for("llava", {"anchor": {}}, projector=False)
    with pytest.raises(MMTuningError, match="vision layer 9 does not exist"):
        session_for("llava", {"multiscale": {"layers": [9]}})


def test_detach_removes_hooks_and_loss_modules():
    model = tiny_model("llava")
    inputs = tiny_batch(model).inputs
    session = MMTuning({"losses": {"anchor": {}, "contrastive": {}}})
    wrapped = session.wrap(model)

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in wrapped.modules())

    attached = hook_count()
    assert hasattr(wrapped, "mmtuning_losses")
    capture = session.losses.capture
    session.detach()
    # projector output, language input and output, and the top-level reset: 4 hooks, all gone
    assert attached - hook_count() == 4
    assert not hasattr(wrapped, "mmtuning_losses")
    wrapped(**inputs)
    assert capture.records == {}
    session.attach(wrapped)
    assert hook_count() == attached


def test_no_losses_configured_attaches_nothing():
    model = tiny_model("llava")
    session = MMTuning({})
    wrapped = session.wrap(model)
    assert not hasattr(wrapped, "mmtuning_losses") and session.losses.callbacks() == []
    assert session.losses.capture is None and session.extra_losses(wrapped, {}, None) == {}


def test_a_loss_from_a_plugin_registers_like_the_builtins():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "example_plugin" / "mmtuning_hidden_norm.py"
    spec = importlib.util.spec_from_file_location("mmtuning_hidden_norm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugins.register_plugin(module, name="hidden_norm_test")
    try:
        assert "hidden_norm" in registered_losses()
        model, session, inputs = session_for("idefics3", {"hidden_norm": {"weight": 0.5}, "anchor": {}})
        _, terms = loss_terms(model, session, inputs)
        assert set(terms) == {"loss_align/hidden_norm", "loss_align/anchor"}
        assert terms["loss_align/hidden_norm"].item() > 0
    finally:
        plugins.unregister_plugin(module)
    assert "hidden_norm" not in registered_losses()
