"""DeepSpeed ZeRO-3 through the transformers Trainer's own `deepspeed` setting on 2 CPU processes (torchrun, gloo,
DeepSpeed's CPU accelerator), the `mmtuning:` block on: every parameter partitioned (4-bit weights included), the
per-modality groups kept, keep's term logged, the saved adapter plain PEFT, and equal to one process."""

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_two_ranks

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here (scripts/env.sh installs it in the core venv)")
DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
import deepspeed_ranks  # noqa: E402  (tests/dist: the rank script's settings, shared with the one-process reference)
import fsdp_ranks  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for run in ("full", "equal"):
        run_two_ranks(DIST / "deepspeed_ranks.py", out, run, timeout=600)  # a hang guard, not a measure
    return out, {run: [torch.load(out / f"{run}-rank{r}.pt", weights_only=False) for r in (0, 1)]
                 for run in ("full", "equal")}


def test_every_parameter_is_partitioned_and_the_groups_and_keep_hold(ranks):
    _, runs = ranks
    for run, results in runs.items():
        for result in results:
            assert result["world_size"] == 2 and result["wrapped"] == "DeepSpeedEngine", run
            assert result["partitioned"] == result["params"] > 0, run  # ZeRO-3 for real
    full = runs["full"][0]
    assert full["partitioned_4bit"] > 0
    assert full["base_lrs"] == {"vision": 5e-3, "projector": 5e-3, "language": 2.5e-3}  # language lr 0.5
    for result in runs["full"]:
        keep = [e["loss_keep"] for e in result["log"] if "loss_keep" in e]
        assert len(keep) == 3 and all(value > 0 for value in keep[1:]), keep


def test_zero3_matches_one_process_and_saves_a_plain_adapter(ranks, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from mmtuning_plugin.testing.tiny import tiny_model

    out, _ = ranks
    before, trainer = fsdp_ranks.tiny_run(deepspeed_ranks.STATIC,
                                          lambda: deepspeed_ranks.arguments(str(tmp_path), 2, deepspeed=False))
    single = fsdp_ranks.lora_state(trainer.model)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_model("llava"), str(out / "equal-adapter"))
    sharded = {k: v for k, v in loaded.state_dict().items() if k in single}
    moved, gap = fsdp_ranks.gaps(single, sharded, before)
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)  # within float32 reduction order, as for FSDP2
    saved = load_file(str(out / "full-adapter" / "adapter_model.safetensors"))
    assert saved and all(t.numel() > 0 for t in saved.values())  # gathered, not one rank's empty partition
