"""The built wheel works on its own: installed into a clean venv (no checkout on the path), `mmtune demo --steps
20` runs from it, the embedded demo model and recipes included. The release steps (docs/release.md) rely on it.

Uses the uv that scripts/test bootstraps (MMTUNING_UV_BIN, its indexes and cache: seconds once the core venv was
built); without it, plain venv + pip (minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command[:4]}: {result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_built_wheel_installs_into_a_clean_venv_and_runs_the_demo(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)])
    wheels = list((tmp_path / "dist").glob("mmtuning_plugin-*.whl"))
    assert len(wheels) == 1
    venv, constraints = tmp_path / "venv", ROOT / "constraints" / "core.txt"
    uv = os.environ.get("MMTUNING_UV_BIN")
    if uv:
        run([uv, "venv", "-q", "--python", sys.executable, str(venv)])
        run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-c", str(constraints),
             f"{wheels[0]}[demo]"])
    else:
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints), f"{wheels[0]}[demo]"])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    where = run([str(venv / "bin" / "python"), "-c", "import mmtuning_plugin; print(mmtuning_plugin.__file__)"],
                cwd=tmp_path, env=env).stdout
    assert str(venv) in where  # the installed copy, not the checkout
    result = run([str(venv / "bin" / "mmtune"), "demo", "--steps", "20", "--out", str(tmp_path / "demo"), "--json"],
                 cwd=tmp_path, env=env)
    report = json.loads(result.stdout)
    assert set(report["arms"]) == {"plain_lora", "mmtuning"}
    assert all((tmp_path / "demo" / name).exists() for name in ("results.json", "curves.png"))
