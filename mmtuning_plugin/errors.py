"""One exception type for everything a user can fix: the CLI prints its message, no traceback.

Errors raised by the file system, torch or safetensors deep inside a command are translated in one place,
`user_message` (called by the CLI's command boundary), from the table `TRANSLATIONS`: exception class ->
a function writing what was wrong, where, and what to do instead.
"""

from __future__ import annotations

import difflib
import errno
import os
from typing import Callable, Iterable, Optional


class MMTuningError(ValueError):
    """A problem in the user's input or model, phrased as what was wrong and what to write instead."""


class PlanMismatchError(MMTuningError):
    """PEFT (or a host) wrapped a different set of modules than the target plan asked for."""


# Set to 1 to see the traceback of an unexpected error instead of its one-paragraph summary.
TRACEBACK_ENV = "MMTUNE_TRACEBACK"

# errno -> (what happened, what to do). The path comes from the OSError itself.
OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full (no space left on device)",
                   "free some space or choose an --out on another disk; the partial output was removed"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space or choose an --out on another disk"),
    errno.EFBIG: ("the file grew past the size limit of this process or file system",
                  "raise the limit (ulimit -f) or choose an --out on another disk; the partial output was removed"),
    errno.EROFS: ("the file system is read-only", "choose an --out on a writable disk"),
    errno.EACCES: ("permission denied", "choose a path you can write to (or read from), or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a path you own, or fix its permissions"),
    errno.EISDIR: ("it is a directory where a file was expected", "pass the file itself, not a directory"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose a path whose parents are directories"),
    errno.ENOENT: ("no such file or directory", "check the path (relative paths start at the current directory)"),
    errno.EEXIST: ("it already exists", "choose another path, or pass --force where the command offers it"),
    errno.ENOTEMPTY: ("the directory is not empty", "choose another path, or pass --force where the command offers it"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.EIO: ("the disk reported an input/output error", "check the disk (dmesg) and run again"),
}


def os_problem(error: OSError) -> tuple[str, str]:
    """(what happened, what to do) for an OSError, from OS_ERRORS."""
    return OS_ERRORS.get(error.errno, (error.strerror or str(error), "check the path and run again"))


def _os_error(error: OSError) -> Optional[str]:
    if error.errno == errno.EPIPE:  # `mmtune ... --json | head`: the reader left; click ends quietly
        return None
    where = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None) or "a file"
    what, fix = os_problem(error)
    return f"{where}: {what}. {fix[0].upper()}{fix[1:]}."


def _safetensors_error(error: Exception) -> str:
    return (f"a .safetensors file is not a valid safetensors file ({error}): it is truncated, corrupt or another "
            f"format. Copy or download it again; mmtune reads safetensors checkpoints and adapters only.")


def _unicode_error(error: UnicodeDecodeError) -> str:
    return (f"a file that should be text (YAML or JSON) holds binary data ({error.reason} at byte {error.start}). "
            f"Pass the text file (a YAML spec, adapter_config.json, config.json), not a weights or archive file.")


def _torch_shape_error(error: RuntimeError) -> Optional[str]:
    text = str(error)
    if "size mismatch" in text or "is invalid for input of size" in text or "must match the size" in text:
        return (f"tensor shapes do not fit ({text.splitlines()[0]}): the weights on disk do not match the config.json "
                f"beside them, or the adapter belongs to another base model. Pass the base model the adapter was "
                f"trained on, with its own config.json.")
    return None


def _unexpected(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return (f"mmtune stopped on an unexpected {type(error).__name__}: {first}. This is a bug in mmtune, not in your "
            f"input: please report it with the command you ran (set {TRACEBACK_ENV}=1 to see the traceback). "
            f"Input files are never modified.")


def _safetensors_class() -> tuple[type, ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors keep it in the rust module only
        try:
            from safetensors._safetensors_rust import SafetensorError  # type: ignore
        except ImportError:
            return ()
    return (SafetensorError,)


def translations() -> list[tuple[tuple[type, ...], Callable[[BaseException], Optional[str]]]]:
    """exception classes -> message builder, first match wins; a builder may decline (None) to fall through."""
    return [
        ((MMTuningError,), str),
        ((OSError,), _os_error),
        (_safetensors_class(), _safetensors_error),
        ((UnicodeDecodeError,), _unicode_error),
        ((RuntimeError,), _torch_shape_error),
        ((Exception,), _unexpected),
    ]


def user_message(error: BaseException) -> Optional[str]:
    """The one paragraph the CLI prints for `error`, or None to let it through (exits, interrupts, debugging)."""
    if not isinstance(error, Exception) or os.environ.get(TRACEBACK_ENV) == "1" and not isinstance(error, MMTuningError):
        return None
    for classes, build in translations():
        if classes and isinstance(error, classes):
            message = build(error)
            if message is not None:
                return message
    return None


# PEFT / Axolotl / LLaMA-Factory spellings of mmtuning keys, which string similarity alone misses (rank ~ quant).
KEY_SYNONYMS = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "target_modules": "modules", "lora_target": "modules", "layers_to_transform": "layers",
                "learning_rate": "lr", "dora": "use_dora", "rslora": "use_rslora", "loss": "losses"}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean `r`?)` for the closest valid key (PEFT spellings such as lora_alpha included), else ''."""
    choices = [str(c) for c in choices]
    synonym = KEY_SYNONYMS.get(str(word).lower())
    matches = [synonym] if synonym in choices else difflib.get_close_matches(str(word), choices, n=1, cutoff=0.4) or \
        difflib.get_close_matches(str(word).removeprefix("lora_"), choices, n=1, cutoff=0.4)
    return f" (did you mean `{matches[0]}`?)" if matches else ""


def unknown_key(word: str, choices: Iterable[str], noun: str = "key") -> str:
    choices = list(choices)
    return f"unknown {noun}{did_you_mean(word, choices)}; valid {noun}s here are: {', '.join(choices)}"
