"""The scripts in examples/ run as a user runs them (docs/data.md shows their commands): data written, a Trainer
run with keep that saves an adapter, and `mmtune eval` scoring that adapter from another directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mmtuning_plugin.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_trainer_example_trains_with_keep_and_its_adapter_is_scored(tmp_path, monkeypatch):
    run_example("make_demo_data.py", "data", cwd=tmp_path)
    first = json.loads((tmp_path / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"image", "question", "answer"} and (tmp_path / "data" / first["image"]).is_file()
    out = run_example("train_with_trainer.py", "--data", "data", "--out", "run", "--steps", "3", cwd=tmp_path)
    assert "mmtune eval" in out and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    monkeypatch.chdir(tmp_path / "data")  # not where the run started
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "adapter"), "--target", "target.jsonl",
                                      "--general", "general.jsonl", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"adapter", "base", "match", "sets", "E", "F", "O"}
    assert {"items", "before", "after", "before_by_type", "after_by_type"} <= set(report["sets"]["general"])
