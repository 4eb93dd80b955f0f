"""The host conformance scenario: one `mmtuning:` block run through the transformers Trainer, `axolotl train` and
`mmtune llamafactory train` on the same tiny LLaVA, and the checks that the three runs agree.

Each host's own test module runs the scenario once (test_axolotl.py: `llava_lora`; test_llamafactory.py:
`scenario`) and compares its `mmtuning_report.json` with the Trainer's (`trainer_report`, run in this venv, shared
by every module through the `trainer_reference` fixture of conftest.py): the same modules got adapters, with the
same ranks and alpha per modality, under the same quantization, schedule and losses; the reports have one schema
and every host went through every phase of the host contract (session.PHASES) in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmtuning_plugin.report import REPORT_FILE, REPORT_VERSION
from mmtuning_plugin.session import PHASE_NAMES

# vision + projector + language adapters, `quant: balanced`, a layer schedule, one loss
SCENARIO: dict[str, Any] = {
    "vision": {"modules": "attention", "layers": {"top": 2}, "r": 4},
    "projector": {"r": 8},
    "language": {"modules": "all-linear", "r": 8, "schedule": {"type": "top_down", "start": 2, "every": 0.25}},
    "r": 8, "alpha": 16, "quant": "balanced", "losses": {"anchor": {"weight": 0.1}},
}
TRAINER_STEPS = 2
# The sections of the report that must be equal across hosts for the same block on the same model.
SAME_ACROSS_HOSTS = ("version", "phases", "plan", "losses", "keep", "base_layer_types")


def expected_llava_modules() -> dict[str, int]:
    """SCENARIO on the tiny LLaVA, written out from the architecture, not from the plan: vision top-2 of the 3
    layers LLaVA reads (vision_feature_layer -2, so layers 1-2 of 4; attention, r=4), both projector linears
    (r=8), every Linear of the 4 language layers (r=8)."""
    modules = {}
    for layer in (1, 2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            modules[f"model.vision_tower.encoder.layers.{layer}.self_attn.{proj}"] = 4
    for linear in ("linear_1", "linear_2"):
        modules[f"model.multi_modal_projector.{linear}"] = 8
    for layer in range(4):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            modules[f"model.language_model.layers.{layer}.{proj}"] = 8
    return modules


def read_report(output_dir: Path) -> dict[str, Any]:
    path = Path(output_dir) / REPORT_FILE
    assert path.is_file(), f"no {REPORT_FILE} in {output_dir}: {sorted(p.name for p in Path(output_dir).iterdir())}"
    leftovers = [p.name for p in Path(output_dir).iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers  # written atomically: no temporary sibling stays behind
    return json.loads(path.read_text())


def trainer_report(root: Path) -> dict[str, Any]:
    """SCENARIO through the transformers Trainer (this venv): load with the policy's BitsAndBytesConfig, prepare,
    wrap, train TRAINER_STEPS steps; returns its report (the reference the hosts are compared with)."""
    import torch
    from transformers import TrainingArguments

    from mmtuning_plugin.integrations.hf import MMTuningTrainer, from_pretrained
    from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch
    from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint("llava", root / "llava")
    model, session = from_pretrained(checkpoint, SCENARIO, dtype=torch.float32)
    batch = tiny_batch(model, batch=2)
    args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=2, max_steps=TRAINER_STEPS,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, 4),
                              data_collator=stack_rows, mmtuning=session)
    trainer.train()
    report = read_report(root / "out")
    report["_log_history"] = trainer.state.log_history
    return report


def check_report(report: dict[str, Any], host: str) -> None:
    """One host's report of SCENARIO on the tiny LLaVA, checked against the architecture."""
    assert report["version"] == REPORT_VERSION and report["host"] == host
    assert report["status"] == "finished" and report["step"] > 0
    assert report["phases"] == list(PHASE_NAMES), report["phases"]  # every phase, in the contract's order
    modalities = report["plan"]["modalities"]
    expected = expected_llava_modules()
    for modality, rank in (("vision", 4), ("projector", 8), ("language", 8)):
        row = modalities[modality]
        names = {name for name in expected if modality_of(name) == modality}
        assert set(row["targeted"]) == names and row["targets"] == len(names), modality
        assert (row["r"], row["alpha"]) == (rank, 2 * rank), modality  # alpha/r of the block's 16/8 everywhere
    quant = report["quantization"]
    assert quant["policy"] == "balanced" and quant["verified"] is True
    assert quant["modalities"]["language"]["4bit"] == 4 * 7 and quant["modalities"]["projector"]["4bit"] == 0
    assert set(report["losses"]) == {"anchor"} and report["losses"]["anchor"]["weight"] == 0.1
    assert report["schedule"]["static"] is False and report["schedule"]["stages"]["language"]
    groups = {group["name"]: group for group in report["optimizer_groups"]}
    assert sorted(groups) == ["language", "projector", "vision"]
    for name, group in groups.items():
        adapted = {module_of(p) for p in group["parameters"]}
        assert adapted == {m for m in expected if modality_of(m) == name}, name
        assert group["tensors"] == 2 * len(adapted)  # lora_A and lora_B of each, nothing else
    assert report["versions"]["mmtuning"] and report["versions"]["peft"]


def assert_conforms(report: dict[str, Any], reference: dict[str, Any]) -> None:
    """A host's report of SCENARIO equals the Trainer's wherever the host cannot matter."""
    assert set(report) - {"_log_history"} == set(reference) - {"_log_history"}  # one schema
    for section in SAME_ACROSS_HOSTS:
        assert report[section] == reference[section], section
    assert report["peft"] == reference["peft"]  # exact names, rank and alpha patterns
    assert report["quantization"] == reference["quantization"]
    assert report["schedule"]["stages"] == reference["schedule"]["stages"]

    def groups(r):
        return {g["name"]: sorted(g["parameters"]) for g in r["optimizer_groups"]}

    assert groups(report) == groups(reference)
    assert set(report["versions"]) - set(reference["versions"]) == {report["host"]}


def module_of(parameter: str) -> str:
    return parameter.removeprefix("base_model.model.").split(".lora_")[0]


def modality_of(name: str) -> str:
    if "multi_modal_projector" in name:
        return "projector"
    return "vision" if "vision_tower" in name else "language"
