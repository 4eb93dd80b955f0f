"""FSDP2 through the transformers Trainer's own switch (`fsdp`, `fsdp_config: {fsdp_version: 2}`) on 2 CPU processes
(torchrun, gloo): accelerate would wrap DDP there and shard nothing, so mmtuning shards the model itself
(mmtuning_plugin/sharding.py). Every parameter is asserted to be a DTensor; the `mmtuning:` block is fully on."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import run_two_ranks
from transformers import TrainingArguments

from mmtuning_plugin.config import load_config
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.sharding import check_fsdp, fsdp_request

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
import fsdp_ranks  # noqa: E402  (tests/dist: the rank script's settings, shared with the one-process reference)

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_two_ranks(DIST / "fsdp_ranks.py", out, timeout=900)  # a hang guard, not a measure
    return out, {run: [torch.load(out / f"{run}-rank{r}.pt", weights_only=False) for r in (0, 1)]
                 for run in ("full", "resumed", "equal", "accumulated")}


def test_every_parameter_is_sharded_and_ranks_end_identical(ranks):
    _, runs = ranks
    for run, results in runs.items():
        for result in results:
            assert result["world_size"] == 2 and result["wrapped"] != "DistributedDataParallel", run
            assert result["dtensor"] == result["params"] > 0, run  # sharded for real, not DDP
        assert results[0]["after"].keys() == results[1]["after"].keys()
        assert all(torch.equal(t, results[1]["after"][k]) for k, t in results[0]["after"].items()), run
    assert runs["full"][0]["linear4bit"]  # the 4-bit language layers are sharded too


def test_frozen_layers_stay_frozen_through_the_stage_change_and_keep_is_logged(ranks):
    _, runs = ranks
    full = runs["full"][0]
    before, after = full["before"], full["after"]
    language = lambda layer: [k for k in after if f"language_model.layers.{layer}." in k]  # noqa: E731
    assert all(torch.equal(before[k], after[k]) for layer in (0, 1) for k in language(layer))
    assert all(not torch.equal(before[k], after[k]) for layer in (2, 3) for k in language(layer) if "lora_B" in k)
    projector = [k for k in after if "multi_modal_projector" in k and "modules_to_save" in k]
    assert projector and all(not torch.equal(before[k], after[k]) for k in projector)  # trained whole, sharded
    stages = [e["mmtuning_stage"] for e in full["log"] if "mmtuning_stage" in e]
    assert [s["language"] for s in stages] == ["3", "2-3"], stages
    keep = [e["loss_keep"] for e in full["log"] if "loss_keep" in e]
    assert len(keep) == 4 and all(value > 0 for value in keep[1:]), keep


def test_resuming_mid_schedule_from_the_sharded_checkpoint_equals_the_uninterrupted_run(ranks):
    out, runs = ranks
    assert sorted(p.name for p in (out / "full" / "checkpoint-2" / "mmtuning_fsdp").iterdir()) == \
        ["rank0.pt", "rank1.pt", "world.json"]
    for rank in (0, 1):
        full, resumed = runs["full"][rank]["after"], runs["resumed"][rank]["after"]
        assert all(torch.equal(t, resumed[k]) for k, t in full.items())


@pytest.mark.parametrize("run, accumulation", [("equal", 1), ("accumulated", 2)])
def test_sharded_run_matches_one_process_on_the_same_global_batch(ranks, tmp_path, run, accumulation):
    """Micro-batch 1 on each of 2 ranks against micro-batch 2 in one process (both with `accumulation` micro-batches
    per step; the sharded one reduces once per step): equal within 1e-4 (float32 reduction order differs; Adam's
    normalised step turns 1e-7 gradient differences on near-zero entries into ~1e-5)."""
    _, runs = ranks
    _, trainer = fsdp_ranks.tiny_run(fsdp_ranks.SCHEDULED, lambda: fsdp_ranks.arguments(
        str(tmp_path), 2, fsdp=False, save_strategy="no", gradient_accumulation_steps=accumulation))
    moved, gap = fsdp_ranks.gaps(fsdp_ranks.lora_state(trainer.model), runs[run][0]["after"], runs[run][0]["before"])
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)


def test_the_saved_output_is_a_plain_peft_adapter_with_full_tensors(ranks):
    from peft import PeftModel
    from safetensors.torch import load_file

    from mmtuning_plugin.demo.model import MODEL_DIR
    from mmtuning_plugin.demo.runner import load_base
    from mmtuning_plugin.session import MMTuning

    out, runs = ranks
    saved = load_file(str(out / "full-adapter" / "adapter_model.safetensors"))
    after = runs["full"][0]["after"]
    assert len(saved) == len(after)  # every adapter tensor (and the projector trained whole), once
    session = MMTuning(fsdp_ranks.FULL)
    model = PeftModel.from_pretrained(load_base(MODEL_DIR, session, four_bit=True), str(out / "full-adapter"))
    state = model.state_dict()
    for key, tensor in after.items():
        assert torch.equal(state[key].cpu(), tensor), key  # full shapes, the trained values


@pytest.mark.parametrize("block, options, words", [
    ({}, {"fsdp_version": 1}, ["fsdp_version 1 on CPU", "fsdp_version: 2"]),
    ({"quant": {"preset": "balanced", "quant_storage": "uint8"}}, {"fsdp_version": 2}, ["quant_storage: uint8", "auto"]),
    ({"language": {"init": "pissa"}}, {"fsdp_version": 2}, ["init: pissa under fsdp", "init: lora"]),
    ({"projector": {"selective": {"method": "spider"}}}, {"fsdp_version": 2}, ["spider under fsdp", "selective: full"]),
])
def test_what_cannot_be_sharded_is_refused_naming_both_settings(tmp_path, block, options, words):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, fsdp_config=options, report_to=[])
    with pytest.raises(MMTuningError) as error:
        check_fsdp(fsdp_request(args), load_config(block))
    for word in words:
        assert word in str(error.value), str(error.value)


def test_fsdp_without_a_process_group_is_refused_before_training(tmp_path):
    from mmtuning_plugin.integrations.hf import MMTuningTrainer
    from mmtuning_plugin.session import MMTuning
    from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2)
    session = MMTuning({"language": {"modules": "attention"}})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, fsdp_config={"fsdp_version": 2},
                             report_to=[], max_steps=1, remove_unused_columns=False)
    with pytest.raises((MMTuningError, ValueError)) as error:  # transformers refuses it first where it checks
        MMTuningTrainer(model=session.wrap(model), args=args, train_dataset=RepeatedBatch(batch.inputs, 2),
                        data_collator=stack_rows, mmtuning=session).train()
    assert "distributed" in str(error.value)


def test_inspect_targets_shows_model_state_per_rank_under_fsdp2():
    import json

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    def sharding(*options):
        result = CliRunner().invoke(app, ["inspect-targets", "qwen2_vl", "--quant", "balanced", "--json", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    one = sharding("--world-size", "1")["sharding"]
    eight = sharding("--world-size", "8")
    assert one["per_rank_bytes"] == one["one_process_bytes"] and one["gathered_at_peak_bytes"] == 0
    rank = eight["sharding"]
    assert rank["one_process_bytes"] == one["one_process_bytes"] == eight["quant"]["total"]["total_bytes"]
    assert rank["sharded_state_bytes"] == -(-rank["one_process_bytes"] // 8)
    assert rank["sharded_state_bytes"] < rank["per_rank_bytes"] < rank["one_process_bytes"]
    assert rank["largest_unit"].startswith("model.language_model.layers.")
    refused = CliRunner().invoke(app, ["inspect-targets", "qwen2_vl", "--world-size", "0"])
    assert refused.exit_code == 2


@pytest.mark.parametrize("block, zero, words", [
    ({"language": {"schedule": {"type": "top_down", "start": 1, "every": 2}}}, 2,
     ["mmtuning.language.schedule under deepspeed", "later stages would never train", "fsdp_version: 2"]),
    ({"quant": {"preset": "balanced", "quant_storage": "uint8"}}, 3, ["quant_storage: uint8 under deepspeed ZeRO-3"]),
    ({"projector": {"selective": {"method": "spider"}}}, 3, ["spider under deepspeed ZeRO-3", "selective: full"]),
])
def test_what_deepspeed_zero_cannot_do_is_refused_naming_both_settings(tmp_path, block, zero, words):
    import json

    from mmtuning_plugin.sharding import deepspeed_problems, zero_stage

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": zero}}))
    assert zero_stage(str(path)) == zero and zero_stage({"zero_optimization": {"stage": zero}}) == zero
    text = "; ".join(deepspeed_problems(zero_stage(str(path)), load_config(block)))
    for word in words:
        assert word in text, text
    assert deepspeed_problems(zero_stage(str(path)), load_config({})) == []  # the plain block shards fine
    with pytest.raises(MMTuningError, match="cannot read it as a DeepSpeed JSON config"):
        zero_stage(str(tmp_path / "missing.json"))
