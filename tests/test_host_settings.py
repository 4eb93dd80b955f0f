"""A host's own LoRA keys next to an `mmtuning:` block: the same rule for Axolotl and LLaMA-Factory."""

from __future__ import annotations

import pytest

from mmtuning_plugin.config import load_config
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.host_settings import (AXOLOTL, LLAMAFACTORY, effective_settings, kbit_settings_not_applied, refuse,
                                           replaced_targets, with_host_defaults)

TYPICAL = {"Axolotl": {"lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True},
           "LLaMA-Factory": {"lora_rank": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": "all"}}


@pytest.mark.parametrize("keys", [AXOLOTL, LLAMAFACTORY], ids=lambda k: k.host)
def test_host_values_are_the_blocks_defaults_and_keep_alpha_over_r_per_modality(keys):
    conflicts: list[str] = []
    block = with_host_defaults({"vision": {"layers": {"top": 2}, "r": 8}}, TYPICAL[keys.host], keys, conflicts)
    config = load_config(block)
    assert conflicts == []
    assert (config.r, config.alpha, config.dropout) == (32, 16, 0.05)
    assert config.scale_alpha("vision") / config.rank("vision") == 0.5  # the user's alpha/r, kept
    assert effective_settings(config) == ("vision r=8 alpha=4, projector r=32 alpha=16, language r=32 alpha=16, "
                                          "dropout 0.05")
    assert replaced_targets(TYPICAL[keys.host], keys) == [f"{keys.targets[-1]}: {TYPICAL[keys.host][keys.targets[-1]]}"]


@pytest.mark.parametrize("keys", [AXOLOTL, LLAMAFACTORY], ids=lambda k: k.host)
def test_only_real_contradictions_are_refused_all_in_one_message(keys):
    conflicts: list[str] = []
    with_host_defaults({"r": 32, "alpha": 64, "dropout": 0.1}, TYPICAL[keys.host], keys, conflicts)
    assert len(conflicts) == 2  # r is equal (32 == 32), alpha and dropout differ
    with pytest.raises(MMTuningError) as error:
        refuse(conflicts, "train.yml", keys.host)
    message = str(error.value)
    assert message.startswith(f"train.yml: these {keys.host} settings contradict the `mmtuning:` block")
    assert "lora_alpha: 16` vs `mmtuning.alpha: 64`" in message and "lora_dropout: 0.05` vs `mmtuning.dropout: 0.1`" in message
    refuse([], "train.yml", keys.host)  # nothing to refuse: no error


def test_unset_booleans_and_absent_keys_give_no_defaults():
    conflicts: list[str] = []
    block = with_host_defaults(None, {"peft_use_dora": False, "lora_r": None}, AXOLOTL, conflicts)
    assert block == {} and conflicts == []
    assert with_host_defaults({}, {"use_dora": True}, LLAMAFACTORY, conflicts) == {"use_dora": True}


@pytest.mark.parametrize("keys", [AXOLOTL, LLAMAFACTORY], ids=lambda k: k.host)
def test_kbit_settings_the_host_would_drop_are_named_only_when_written(keys):
    written = load_config({"quant": {"preset": "balanced", "upcast_16bit": False, "checkpoint_language": True}})
    problems = kbit_settings_not_applied(written, keys)
    assert [p.split("`")[1] for p in problems] == ["mmtuning.quant.checkpoint_language", "mmtuning.quant.upcast_16bit"]
    assert all(keys.host in p for p in problems)
    assert kbit_settings_not_applied(load_config({"quant": "balanced"}), keys) == []
    assert kbit_settings_not_applied(load_config({}), keys) == []


@pytest.mark.parametrize("keys", [AXOLOTL, LLAMAFACTORY], ids=lambda k: k.host)
def test_host_dropout_on_a_bare_projector_weight_is_refused_by_the_key_the_user_wrote(keys, tmp_path):
    """Gemma 3's projector is a bare weight (PEFT target_parameters, no dropout): a typical `lora_dropout: 0.05`
    is named as `lora_dropout`, never as the block's `dropout` the user did not write, with what to write instead."""
    from mmtuning_plugin.loading import build_skeleton
    from mmtuning_plugin.session import MMTuning
    from mmtuning_plugin.testing.tiny import tiny_config

    tiny_config("gemma3").save_pretrained(tmp_path / "gemma3")
    model = {keys.model[-1]: str(tmp_path / "gemma3")}
    conflicts: list[str] = []
    with_host_defaults({"vision": {"layers": {"top": 2}}}, {**TYPICAL[keys.host], **model}, keys, conflicts)
    with pytest.raises(MMTuningError) as error:
        refuse(conflicts, "train.yml", keys.host)
    message = " ".join(str(error.value).split())
    assert "`lora_dropout: 0.05` (gemma3's projector is the bare weight model.multi_modal_projector." in message
    assert "write `lora_dropout: 0` or remove it" in message and "`mmtuning.projector: {full: true}`" in message
    assert "`dropout" not in message and "mmtuning.dropout" not in message
    # each way out the message offers plans, with no other conflict
    for block, settings in (({}, {"lora_dropout": 0}), ({"projector": {"full": True}}, {"lora_dropout": 0.05}),
                            ({"projector": False}, {"lora_dropout": 0.05})):
        conflicts = []
        fixed = with_host_defaults(block, {**settings, **model}, keys, conflicts)
        assert conflicts == [], (block, settings)
        MMTuning(fixed).plan_for(build_skeleton(tiny_config("gemma3")))
    # a model whose projector is Linear keeps the host's dropout without a word
    tiny_config("llava").save_pretrained(tmp_path / "llava")
    conflicts = []
    block = with_host_defaults({}, {**TYPICAL[keys.host], keys.model[-1]: str(tmp_path / "llava")}, keys, conflicts)
    assert conflicts == [] and block["dropout"] == 0.05
