"""Placing `--out` so that no output is lost: write into a temporary sibling, rename it into place atomically.

- The final rename never replaces an output that appeared while this run was writing (another run, the
  user), unless `--force`: of two runs racing for one `--out`, exactly one wins and the other exits 2.
  Linux's renameat2(RENAME_NOREPLACE) makes that atomic; where it is missing, a directory renamed onto an
  existing non-empty directory or file fails anyway, which covers every output convert writes.
- A temporary sibling is named `.NAME.tmp-PID-START-RANDOM` (its owner's pid and process start time), so the
  next run on that `--out` removes the leftovers of killed runs and refuses to race a run still writing.
- A failure while writing (a full disk included) removes the temporary and says so; inputs are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ..errors import MMTuningError, os_problem

log = logging.getLogger("mmtuning")

AT_FDCWD = -100
RENAME_NOREPLACE = 1
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def process_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (Linux /proc), so a reused pid is not taken for its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _temp_pattern(out: Path) -> re.Pattern:
    return re.compile(re.escape(temp_prefix(out)) + r"(?P<pid>\d+)-(?P<start>\w+)-\w+$")


def owner_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    current = process_start(pid)
    return current is None or start == "na" or current == start


def sweep(out: Path, force: bool) -> list[str]:
    """Remove temporaries of dead runs on `out`; a live one means a run is writing `out` now (refused unless
    --force). Returns what was done, for the log."""
    notes = []
    pattern = _temp_pattern(out)
    for item in sorted(out.parent.glob(glob_escape(temp_prefix(out)) + "*")):
        match = pattern.match(item.name)
        if match is None:
            notes.append(f"{item} looks like the temporary output of an older or foreign run; remove it if no mmtune "
                         f"run is writing {out}")
            continue
        pid, start = int(match["pid"]), match["start"]
        if owner_alive(pid, start):
            if not force:
                raise MMTuningError(f"--out {out}: another mmtune run (pid {pid}) is writing it right now (into {item}); "
                                    f"wait for it to finish, or choose another --out.")
            notes.append(f"another mmtune run (pid {pid}) is writing {out} too; with --force the later one wins")
            continue
        shutil.rmtree(item, ignore_errors=True)
        notes.append(f"removed {item}, left by a killed run (pid {pid}) on this --out")
    for item in sorted(out.parent.glob(glob_escape(f".{out.name}.old-") + "*")):
        notes.append(f"{item} holds a previous {out.name} that a killed --force run had moved aside; it was kept: "
                     f"move it back or remove it")
    return notes


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError when `target` exists (atomically on Linux)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # EINVAL/ENOSYS/EPERM: this fs lacks the flag
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)  # onto a non-empty directory or a file it fails: nothing is replaced
    except OSError as error:
        if error.errno in _EXISTS:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


def _check_parent(out: Path) -> None:
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MMTuningError(f"--out {out}: {ancestor} is a file, not a directory; choose an --out inside a directory.")


def _refuse(out: Path, error: OSError, doing: str) -> MMTuningError:
    what, fix = os_problem(error)
    where = f" ({error.filename})" if error.filename else ""
    return MMTuningError(f"--out {out}: {doing} failed: {what}{where}. {fix[0].upper()}{fix[1:]}. Nothing was "
                         f"written at --out and the inputs are untouched.")


@contextlib.contextmanager
def safe_output(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Write into a temporary sibling of `out` and rename it into place only when everything succeeded.

    An existing `out` is refused without force, also one that appears while this run writes; `out` may never
    be (or contain, or sit inside) an input."""
    out = _resolved(Path(out))
    for source in inputs:
        source = _resolved(Path(source))
        if out == source or source in out.parents or out in source.parents:
            raise MMTuningError(f"--out {out} overlaps the input {source}; inputs are never modified. "
                                f"Choose an output directory outside the input.")
    if os.path.lexists(out) and not force:
        raise MMTuningError(f"--out {out} already exists; pass --force to replace it or choose another directory.")
    _check_parent(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for note in sweep(out, force):
            log.warning("note: %s", note)
        temp = out.parent / f"{temp_prefix(out)}{os.getpid()}-{process_start(os.getpid()) or 'na'}-{secrets.token_hex(4)}"
        temp.mkdir()
    except OSError as error:
        raise _refuse(out, error, "creating its temporary sibling") from None
    try:
        yield temp
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise _refuse(out, error, "writing") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    try:
        place(temp, out, force)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def place(temp: Path, out: Path, force: bool) -> None:
    """The final rename; with force an existing output is moved aside first and removed after."""
    old = None
    if force and os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        rename_noreplace(temp, out)
    except FileExistsError:
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)
        raise MMTuningError(f"--out {out} appeared while this run was writing (another run or program created it); it "
                            f"was left as it is and this run's result was discarded. Choose another --out, or pass "
                            f"--force to replace it.") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
