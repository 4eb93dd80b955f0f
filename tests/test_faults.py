"""Faults while writing `--out`: an output that appears meanwhile, two runs racing, a full disk, a read-only
file system, and a SIGKILL in the middle of merging a model of a few hundred MB. Nothing is lost or silently
replaced, inputs stay byte-identical, and the next run removes what a killed run left behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtuning_plugin.convert.merge import merge
from mmtuning_plugin.convert.placement import safe_output
from mmtuning_plugin.errors import MMTuningError

from mmtuning_plugin.testing.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = r".*(multi_modal_projector\.linear_1|language_model.*(q_proj|v_proj))"


def _hashes(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def _save_adapter(model, out: Path, base: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config))
    peft.unload()
    return out


def _mmtune(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmtuning_plugin.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny LLaVA base (sharded) and two different adapters on it."""
    root = tmp_path_factory.mktemp("faults")
    base = root / "inputs" / "base"
    tiny_model("llava").save_pretrained(base, max_shard_size="300KB")
    first = _save_adapter(tiny_model("llava"), root / "inputs" / "first", base, 1)
    second = _save_adapter(tiny_model("llava"), root / "inputs" / "second", base, 2)
    return root, base, first, second


def test_an_output_that_appears_meanwhile_is_kept_and_this_result_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MMTuningError, match="appeared while this run was writing"):
        with safe_output(out, force=False) as temp:
            (temp / "result.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and not _leftovers(out)
    (out / "theirs.txt").unlink()
    out.rmdir()
    with pytest.raises(MMTuningError, match="appeared"):  # an empty directory is not replaced either
        with safe_output(out, force=False) as temp:
            (temp / "result.txt").write_text("ours")
            out.mkdir()
    assert list(out.iterdir()) == [] and not _leftovers(out)
    with safe_output(out, force=True) as temp:  # --force replaces it
        (temp / "result.txt").write_text("ours")
    assert (out / "result.txt").read_text() == "ours" and not _leftovers(out)


@pytest.mark.slow
def test_two_racing_merges_of_different_adapters_one_wins_and_the_other_exits_2(small, tmp_path):
    root, base, first, second = small
    before = _hashes(root / "inputs")
    out = tmp_path / "merged"
    runs = {adapter: _mmtune("convert", "merge", adapter, "--base", base, "--out", out) for adapter in (first, second)}
    results = {adapter: (proc.wait(timeout=300), proc.stderr.read().decode()) for adapter, proc in runs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    (winner, _), = [(a, r) for a, r in results.items() if r[0] == 0]
    (_, (_, message)), = [(a, r) for a, r in results.items() if r[0] == 2]
    flat = " ".join(message.split())
    assert any(text in flat for text in ("already exists", "is writing it right now", "appeared while this run was writing"))
    assert "Traceback" not in message
    expected = merge(winner, base, tmp_path / "expected", progress=False)  # merging is deterministic
    assert _hashes(out) == _hashes(tmp_path / "expected") and expected["merged_modules"] > 0
    assert not _leftovers(out) and _hashes(root / "inputs") == before


@pytest.mark.slow
def test_a_full_disk_exits_2_and_removes_the_partial_output(small, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, EFBIG) fails the write on any Linux: same cleanup path as ENOSPC."""
    import resource

    root, base, first, _ = small
    before = _hashes(root / "inputs")
    out = tmp_path / "merged"
    limit = 100_000
    proc = _mmtune("convert", "merge", first, "--base", base, "--out", out,
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    _, stderr = proc.communicate(timeout=300)
    message = " ".join(stderr.decode().split())
    assert proc.returncode == 2, message
    assert "--out" in message and "size limit" in message and "partial output was removed" in message
    assert "Traceback" not in message
    assert not out.exists() and not _leftovers(out) and _hashes(root / "inputs") == before


def _in_private_mount(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})


def _can_mount(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        return False
    return _in_private_mount(f"mount -t tmpfs -o size=64k tmpfs {probe}").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("mount, words", [
    ("mount -t tmpfs -o size=256k tmpfs {disk}", ["disk is full", "partial output was removed"]),
    ("mount --bind {disk} {disk} && mount -o remount,bind,ro {disk}", ["read-only"]),
])
def test_no_space_and_read_only_file_systems_exit_2(small, tmp_path, mount, words):
    """A real 256 KiB tmpfs (ENOSPC) and a read-only bind mount (EROFS), in a private mount namespace."""
    if not _can_mount(tmp_path):
        pytest.skip("unshare -r -m (user and mount namespaces) is not available on this machine")
    root, base, first, _ = small
    before = _hashes(root / "inputs")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "merged"
    command = f"{sys.executable} -m mmtuning_plugin.cli convert merge {first} --base {base} --out {out}"
    done = _in_private_mount(f"{mount.format(disk=disk)} || exit 99; {command}; echo \"rc=$?\"; ls -A {disk}")
    assert "rc=2" in done.stdout, (done.stdout, done.stderr)
    message = " ".join(done.stderr.split())
    assert "--out" in message and all(word in message for word in words) and "Traceback" not in message, message
    assert done.stdout.split("rc=2")[1].split() == []  # nothing left on that disk: no output, no temporary
    assert _hashes(root / "inputs") == before


def _progress(stream, pattern: re.Pattern) -> str:
    """Read the merge's progress bar (stderr) until `pattern` shows; blocking reads, no sleeps."""
    seen = b""
    while not pattern.search(seen.decode(errors="replace")):
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"the merge ended before the point the test waits for: {seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.slow
def test_sigkill_mid_merge_of_a_large_model_leaves_nothing_at_out_and_the_next_run_cleans_up(tmp_path, caplog):
    """A ~270 MB LLaVA (real config class, 1024-wide language model) in 6 shards: the merge is stopped after its
    first shard, a second run is refused while the first one lives, the first is SIGKILLed, and the next run
    removes its temporary and writes the complete output."""
    sizes = {"text_config.hidden_size": 1024, "text_config.intermediate_size": 4096, "text_config.head_dim": 128,
             "text_config.num_attention_heads": 8, "text_config.num_key_value_heads": 8}
    inputs = tmp_path / "inputs"
    base = inputs / "base"
    model = tiny_model("llava", **sizes)
    model.save_pretrained(base, max_shard_size="50MB")
    adapter = _save_adapter(model, inputs / "adapter", base, 1)
    del model
    shards = len(list(base.glob("model-*.safetensors")))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert shards >= 4 and size > 200e6, (shards, size)
    before = _hashes(inputs)
    out = tmp_path / "merged"

    proc = _mmtune("convert", "merge", adapter, "--base", base, "--out", out)
    _progress(proc.stderr, re.compile(rf"\b[1-{min(shards - 2, 9)}]/{shards}\b"))  # a shard done, 2+ to go
    proc.send_signal(signal.SIGSTOP)
    try:
        (temp,) = _leftovers(out)
        assert not out.exists() and any(temp.glob("*.safetensors"))
        with pytest.raises(MMTuningError, match=rf"another mmtune run \(pid {proc.pid}\) is writing it right now"):
            merge(adapter, base, out, progress=False)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and _leftovers(out) == [temp]  # killed: nothing at --out, its temporary remains
    assert _hashes(inputs) == before

    with caplog.at_level(logging.WARNING, logger="mmtuning"):
        summary = merge(adapter, base, out, progress=False)
    assert f"removed {temp}, left by a killed run (pid {proc.pid})" in caplog.text
    assert not _leftovers(out) and summary["shards"] == shards
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert _hashes(inputs) == before
