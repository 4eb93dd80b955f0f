"""The `mmtuning:` schema: shorthands, and errors that name the YAML key and the fix."""

import pytest

from mmtuning_plugin.config import LayerSelection, load_config
from mmtuning_plugin.errors import MMTuningError


def test_defaults_train_projector_and_language_but_not_vision():
    config = load_config({})
    assert (config.vision.enabled, config.projector.enabled, config.language.enabled) == (False, True, True)


@pytest.mark.parametrize("value, enabled", [(False, False), ("off", False), (True, True), ({}, True), (None, True)])
def test_modality_shorthands(value, enabled):
    assert load_config({"vision": value}).vision.enabled is enabled


def test_alpha_keeps_the_top_level_ratio_unless_given():
    config = load_config({"r": 16, "alpha": 32, "vision": {"r": 4}, "projector": {"r": 8, "alpha": 8}})
    assert config.scale_alpha("vision") == 8
    assert config.scale_alpha("projector") == 8
    assert config.scale_alpha("language") == 32


@pytest.mark.parametrize(
    "text, mode, payload",
    [("top:8", "top", 8), ({"bottom": 2}, "bottom", 2), ("fraction=0.25", "fraction", 0.25), ("0-2,5", "indices", (0, 1, 2, 5))],
)
def test_layer_selection_forms(text, mode, payload):
    selection = LayerSelection.model_validate(text)
    assert selection.mode == mode
    assert payload in (selection.count, selection.fraction, selection.indices)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"vison": {}}, "mmtuning.vison: unknown key (did you mean `vision`?); valid keys here are: vision, projector, language"),
        ({"vision": {"layer": "all"}}, "mmtuning.vision.layer: unknown key (did you mean `layers`?); valid keys here are: enabled, modules, layers"),
        ({"vision": {"layers": {"top": "eight"}}}, "mmtuning.vision.layers: layers {top: 'eight'}: top takes a whole number"),
        ({"vision": {"layers": "5-2"}}, "range '5-2' runs backwards; write '2-5'"),
        ({"vision": {"layers": {"top": 2, "bottom": 1}}}, "write exactly one of"),
        ({"language": {"modules": []}}, "an empty list selects nothing"),
        ({"language": {"modules": "everything"}}, "mmtuning.language.modules"),
        ({"r": 0}, "mmtuning.r: Input should be greater than or equal to 1"),
        ({"method": "ia3", "use_dora": True}, "use_dora/use_rslora need method: lora"),
        ({"vision": {"full": True}}, "only the projector can be trained whole"),
        ("vision", "expected a mapping"),
    ],
)
def test_errors_name_the_key_and_what_to_write(data, expected):
    with pytest.raises(MMTuningError) as info:
        load_config(data)
    assert expected in str(info.value)
