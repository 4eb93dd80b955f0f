"""Modality maps: every adaptable Linear lands in the right modality, layer and kind."""

import pytest
import torch
from torch import nn

from mmtuning_plugin.arch import ModalityMap, detect_map, lookup_map, resolve_layout
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.testing.tiny import TINY_MODEL_TYPES, tiny_model

# Written independently of arch/builtin.py: (vision prefix, projector prefix(es), language prefix,
# Linear modules per vision layer, projector Linear count, vision layers).
EXPECTED = {
    "llava": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 2, 4),
    "llava_next": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 2, 4),
    "llava_onevision": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 2, 4),
    "qwen2_vl": ("model.visual", ("model.visual.merger",), "model.language_model", 4, 2, 4),
    "qwen2_5_vl": ("model.visual", ("model.visual.merger",), "model.language_model", 5, 2, 4),
    "qwen3_vl": ("model.visual", ("model.visual.merger", "model.visual.deepstack_merger_list"), "model.language_model", 4, 6, 4),
    "idefics3": ("model.vision_model", ("model.connector",), "model.text_model", 6, 1, 4),
    "smolvlm": ("model.vision_model", ("model.connector",), "model.text_model", 6, 1, 4),
    "gemma3": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 0, 4),
    "paligemma": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 1, 4),
    "mistral3": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 7, 3, 4),
    "mllama": ("model.vision_model", ("model.multi_modal_projector",), "model.language_model", 6, 1, 6),
    "internvl": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 2, 4),
    "aya_vision": ("model.vision_tower", ("model.multi_modal_projector",), "model.language_model", 6, 2, 4),
}


def _under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_modality_split_matches_the_model(model_type):
    vision, projectors, language, per_vision_layer, n_projector, vision_layers = EXPECTED[model_type]
    layout = resolve_layout(tiny_model(model_type))
    layered = {m: [l for l in layout.leaves_of(m) if l.layer is not None] for m in ("vision", "language")}

    assert layout.layer_counts == {"vision": vision_layers, "projector": 0, "language": 4}
    assert len(layered["vision"]) == per_vision_layer * vision_layers
    assert len(layered["language"]) == 7 * 4  # q, k, v, o, gate, up, down per decoder layer
    assert all(_under(l.name, vision) and not any(_under(l.name, p) for p in projectors) for l in layered["vision"])
    assert all(_under(l.name, language) for l in layered["language"])
    assert len(layout.leaves_of("projector")) == n_projector
    assert all(any(_under(l.name, p) for p in projectors) for l in layout.leaves_of("projector"))
    # layer indices run 0..N-1 and every layer has the same leaves
    for modality, leaves in layered.items():
        per_layer = {}
        for leaf in leaves:
            per_layer.setdefault(leaf.layer, set()).add(leaf.local)
        assert sorted(per_layer) == list(range(layout.layer_counts[modality]))
    assert {l.kind for l in layered["language"]} == {"attention", "mlp"}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_linear_in_the_layers_is_listed_once(model_type):
    model = tiny_model(model_type)
    layout = resolve_layout(model)
    listed = [l.name for l in layout.leaves]
    assert len(listed) == len(set(listed))
    # every Linear whose path contains a numbered layer of a layer stack is a leaf
    stacks = [s for m in ("vision", "language") for s in layout.modality_map.layer_stacks(m)]
    expected = {n for n, mod in model.named_modules()
                if isinstance(mod, nn.Linear) and any(n.startswith(s + ".") for s in stacks)}
    assert expected <= set(listed)


def test_qwen_merger_is_projector_not_vision():
    layout = resolve_layout(tiny_model("qwen2_vl"))
    names = {l.name: l.modality for l in layout.leaves}
    assert names["model.visual.merger.mlp.0"] == "projector"
    assert names["model.visual.blocks.0.attn.qkv"] == "vision"


def test_mllama_vision_layers_run_through_local_then_global_stack():
    layout = resolve_layout(tiny_model("mllama"))
    by_name = {l.name: l.layer for l in layout.leaves}
    assert by_name["model.vision_model.transformer.layers.3.self_attn.q_proj"] == 3
    assert by_name["model.vision_model.global_transformer.layers.0.self_attn.q_proj"] == 4
    assert by_name["model.vision_model.global_transformer.layers.1.mlp.fc2"] == 5
    cross = [l for l in layout.leaves_of("language") if ".cross_attn." in l.name]
    assert cross and all(l.kind == "attention" for l in cross)


def test_conv_patch_embeddings_and_lm_head_are_extras_not_layer_modules():
    layout = resolve_layout(tiny_model("qwen2_5_vl"))
    extras = {l.kind: l for l in layout.leaves if l.layer is None and l.modality != "projector"}
    assert extras["patch_embed"].module_type == "Conv3d"
    assert extras["lm_head"].name == "lm_head"
    assert extras["embed_tokens"].name == "model.language_model.embed_tokens"


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "idefics3", "mistral3"])
def test_detection_finds_the_same_modalities_as_the_builtin_map(model_type):
    model = tiny_model(model_type)
    detected = detect_map(model)
    builtin = lookup_map(model_type)
    assert detected.vision == builtin.vision
    assert detected.projector == builtin.projector
    assert detected.language == builtin.language
    assert detected.vision_layers == builtin.vision_layers
    assert detected.language_layers == builtin.language_layers
    assert detected.source == "detected"


def test_detection_refuses_when_unsure_and_says_how_to_register():
    import transformers

    config = transformers.AutoConfig.for_model("ovis2")
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    with pytest.raises(MMTuningError, match="register_architectures") as info:
        detect_map(model)  # ovis2 has a built-in map now; detection alone still cannot tell its projector
    assert "ovis2" in str(info.value) and "vision_tower" in str(info.value)


def test_stale_map_names_missing_modules():
    stale = ModalityMap(("llava",), vision=("model.vision_model",), projector=("model.multi_modal_projector",),
                        language=("model.language_model",), vision_layers=("model.vision_model.encoder.layers",),
                        language_layers=("model.language_model.layers",), source="test")
    with pytest.raises(MMTuningError, match="model.vision_model") as info:
        resolve_layout(tiny_model("llava"), stale)
    assert "renamed" in str(info.value)
