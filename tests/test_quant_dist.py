"""Two CPU processes (torchrun, gloo) train QLoRA adapters on 4-bit vision and projector layers in step."""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_two_ranks

from mmtuning_plugin.testing.tiny import tiny_model

pytest.importorskip("bitsandbytes")
RANK_SCRIPT = Path(__file__).parent / "dist" / "qlora_ranks.py"


def test_two_ranks_keep_4bit_vision_and_projector_adapters_identical(tmp_path):
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    out_dir.mkdir()
    tiny_model("qwen2_vl", dtype=torch.bfloat16).save_pretrained(model_dir)
    run_two_ranks(RANK_SCRIPT, model_dir, out_dir, timeout=360)  # a hang guard, not a measure: the suite may run beside it
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["world_size"] == 2
        assert result["vision_adapters"] > 0 and result["projector_adapters"] > 0
        assert result["vision_4bit"] > 0 and result["projector_4bit"] == 2
        assert result["max_diff_across_ranks"] == 0.0
        assert result["moved"] > 0
    assert ranks[0]["initial_checksum"] == ranks[1]["initial_checksum"]
    assert ranks[0]["moved"] == ranks[1]["moved"]
