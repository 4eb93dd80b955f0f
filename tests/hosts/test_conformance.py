"""The host contract through the transformers Trainer, on the conformance scenario (tests/hosts/conformance.py):
vision + projector + language adapters, `quant: balanced` (real bitsandbytes 4-bit on CPU), a layer schedule and
the anchor loss. Axolotl's and LLaMA-Factory's runs of the same scenario are compared with this one in their
own modules (they need their venvs); this one runs everywhere."""

from __future__ import annotations

import json

import pytest

from conformance import SCENARIO, check_report, read_report
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.report import REPORT_FILE, write_report


def test_trainer_goes_through_every_phase_and_reports_the_scenario(trainer_reference):
    check_report(trainer_reference, "transformers")
    logged = [entry for entry in trainer_reference["_log_history"] if "loss" in entry]
    assert logged and all("loss_align/anchor" in entry for entry in logged)  # the loss reached the trainer
    # the layer schedule starts with the top 2 language layers and adds one more at 25% and 50% of training
    stages = trainer_reference["schedule"]["stages"]["language"]
    assert [stage["layers"] for stage in stages] == ["2-3", "1-3", "0-3"]
    assert trainer_reference["schedule"]["timeline"][-1]["language"] == "0-3"


def test_report_is_replaced_atomically_and_a_failed_write_keeps_the_previous_one(tmp_path):
    write_report(tmp_path, {"version": 1, "step": 1})
    with pytest.raises(TypeError):  # a value json cannot write even as text: the old report stays whole
        write_report(tmp_path, {"version": 1, "step": object.__new__(type("Bad", (), {"__str__": None}))})
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == {"version": 1, "step": 1}
    assert read_report(tmp_path)["step"] == 1  # and no temporary file is left


def test_trainer_refuses_an_own_optimizer_next_to_per_modality_learning_rates(tmp_path):
    import torch
    from transformers import TrainingArguments

    from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
    from mmtuning_plugin.testing.tiny import tiny_model

    model, session = prepare_model(tiny_model("llava"), {"projector": {"lr": 10}})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(MMTuningError, match=r"optimizers=\.\.\.\) brings its own optimizer, so mmtuning.projector.lr "
                                            r"would never apply"):
        MMTuningTrainer(model=model, args=args, mmtuning=session, optimizers=(optimizer, None))


def test_trainer_refuses_a_model_loaded_other_than_the_quant_policy_says():
    from mmtuning_plugin.integrations.hf import prepare_model
    from mmtuning_plugin.testing.tiny import tiny_model

    with pytest.raises(MMTuningError, match="differ from mmtuning.quant"):
        prepare_model(tiny_model("llava"), {**SCENARIO, "losses": {}})  # loaded in 16-bit, policy says 4-bit
