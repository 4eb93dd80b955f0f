"""Tensor-at-a-time safetensors reading and writing, so a merge holds one tensor, not one shard, in memory.

safetensors' own `save_file` serialises a whole dict (a shard plus its bytes copy) and `safe_open` maps the
file (its pages count as resident once read). The format is simple (8-byte little-endian header length,
JSON header with dtype/shape/data_offsets, raw little-endian data), so both directions stream here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..errors import MMTuningError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Entries (dtype, shape, data_offsets), metadata, and where the data starts; truncation is an error."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise MMTuningError(f"{path} is truncated or corrupt ({error}); re-download the model.") from None
    if not isinstance(header, dict):
        raise MMTuningError(f"{path} is corrupt (its header is a JSON {type(header).__name__}); re-download the model.")
    metadata = header.pop("__metadata__", {}) or {}
    broken = [name for name, entry in header.items() if not _valid_entry(entry)]
    if broken:
        raise MMTuningError(f"{path} is corrupt: the header entries of {', '.join(broken[:3])} lack a dtype, shape or "
                            f"data offsets; re-download the model.")
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise MMTuningError(f"{path} is truncated ({size} bytes, its header needs {8 + length + end}); re-download the model.")
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise MMTuningError(f"{path}: tensor {name} has dtype {entry['dtype']}, which mmtune convert cannot stream.")
    return header, metadata, 8 + length


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and all(isinstance(n, int) for n in entry["data_offsets"]))


def read_tensor(handle, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    start, end = entry["data_offsets"]
    handle.seek(data_start + start)
    buffer = bytearray(end - start)
    handle.readinto(buffer)
    dtype = DTYPES[entry["dtype"]]
    if not buffer:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def write_streaming(path: Path, plan: Iterable[tuple[str, torch.dtype, list[int], Callable[[], torch.Tensor]]],
                    metadata: dict[str, str]) -> int:
    """Write tensors produced one at a time (name, dtype, shape, producer); returns the data size in bytes."""
    plan = list(plan)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in plan:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, dtype, shape, produce in plan:
            tensor = produce()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            if tensor.numel():
                handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset
