"""Small helpers shared by several test files (pytest puts tests/ on sys.path)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def perturb_lora_b(model, std=0.05, seed=3):
    """Move the adapters away from their zero init, as a few task-loss steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def run_two_ranks(script: Path, *args: str, timeout: float) -> None:
    """`torchrun --nproc_per_node 2` (CPU, gloo) on `script` with this checkout first on the path; fails the test
    with the workers' stderr unless both ranks exit 0, and kills torchrun and both workers on a timeout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
               *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers: they share the new session
        raise
    assert process.returncode == 0, stderr[-3000:]
