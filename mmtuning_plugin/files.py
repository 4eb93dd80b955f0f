"""Reading the text files a user names (YAML specs, config.json, adapter_config.json): every way such a file
can be wrong (missing, a directory, binary, unreadable, broken JSON/YAML, the wrong shape) is an
MMTuningError that names the option or file and says what to pass instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MMTuningError

BINARY_SNIFF = 8192  # a NUL byte in the first 8 KiB: a weights file or archive, not text


def read_text(path: Path, what: str, expected: str) -> str:
    """The file's text; `what` names it for the user (`--spec x.yaml`), `expected` says what belongs there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MMTuningError(f"{what} is a directory; pass {expected} (a file) instead.")
    if not path.exists():
        raise MMTuningError(f"{what}: no such file; pass {expected}.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MMTuningError(f"{what}: cannot read it ({error.strerror}); check its permissions.") from None
    try:
        if b"\0" in data[:BINARY_SNIFF]:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "binary data")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MMTuningError(f"{what} is a binary file, not text; pass {expected}.") from None


def read_yaml(path: Path, what: str, expected: str) -> Any:
    import yaml

    text = read_text(path, what, expected)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MMTuningError(f"{what} is not valid YAML{at}: {problem}. Fix the file ({expected}).") from None


def read_json_object(path: Path, what: str, expected: str) -> dict[str, Any]:
    """A JSON file that must hold one object (a mapping), e.g. config.json or adapter_config.json."""
    text = read_text(path, what, expected)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MMTuningError(f"{what} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. "
                            f"Fix it or restore {expected}.") from None
    if not isinstance(data, dict):
        raise MMTuningError(f"{what} holds a JSON {type(data).__name__}, not an object of settings; restore {expected}.")
    return data
