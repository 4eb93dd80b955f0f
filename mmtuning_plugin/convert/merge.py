"""merge: add an adapter's deltas into the base weights, streaming the checkpoint one shard at a time.

Peak memory is one base tensor plus the adapter, never the whole model (nor a whole shard): each tensor is
read from its shard, the module's delta added (in float32) and written out before the next one is read.

QLoRA adapters were trained against the *dequantized 4-bit* weights, not the original 16-bit ones. With
`four_bit="nf4"` (or "fp4") every Linear weight bitsandbytes would have quantized (all but `skip_4bit`,
default lm_head, as transformers does) is round-tripped through bitsandbytes' 4-bit quantization
(`quant.bnb.roundtrip_4bit`) before the delta is added, so the merged model computes what the adapter saw in training.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import FOUR_BIT
from ..errors import MMTuningError
from ..quant.bnb import BNB_BLOCKSIZES, roundtrip_4bit
from .placement import safe_output
from .adapter import Adapter, Factors, read_adapter
from .base import BaseArchitecture, detect_layout, extra_param_name, load_base, renamed_adapter, verify
from .layouts import CURRENT, LayoutFamily, CHECKPOINT_SPELLINGS, spell
from .stream import DTYPES as STORED_DTYPES, read_header, read_tensor, write_streaming

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": None}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class FourBit:
    quant_type: str = "nf4"  # nf4 | fp4
    blocksize: int = 64
    double_quant: bool = True
    skip: tuple[str, ...] = ("lm_head",)


def check_four_bit(four_bit: FourBit) -> None:
    if four_bit.quant_type not in FOUR_BIT:
        raise MMTuningError(f"--dequantize-4bit {four_bit.quant_type!r}: write nf4 or fp4 (bnb_4bit_quant_type).")
    if four_bit.blocksize not in BNB_BLOCKSIZES:
        raise MMTuningError(f"--blocksize {four_bit.blocksize}: bitsandbytes quantizes 4-bit weights in blocks of "
                            f"{', '.join(map(str, BNB_BLOCKSIZES))}; write the one used in training (default 64).")


def check_device(name: str) -> torch.device:
    """`--device` up front: a torch device string of a device this machine has (cpu, or a visible CUDA GPU)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MMTuningError(f"--device {name!r} is not a device name; write cpu, cuda or cuda:N (e.g. --device cuda:0).") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise MMTuningError(f"--device {name}: merge runs its additions on cpu or cuda; write --device cpu or --device cuda.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MMTuningError(f"--device {name}: torch sees no CUDA GPU on this machine (torch {torch.__version__}); "
                            f"use --device cpu (the default).")
    if device.index is not None and device.index >= count:
        raise MMTuningError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0-{count - 1}; "
                            f"write --device cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}.")
    return device


def check_model_dir(path: Path, option: str) -> None:
    """A base model directory given as `option`: a directory holding config.json (its weights are read later)."""
    if path.is_file():
        raise MMTuningError(f"{option} {path} is a file; pass the model directory that holds it ({path.parent}).")
    if not path.is_dir():
        raise MMTuningError(f"{option} {path}: no such directory; pass the base model's directory (with config.json "
                            f"and its safetensors weights).")
    if not (path / "config.json").is_file():
        raise MMTuningError(f"{option} {path} is not a model directory with config.json; it needs the base model's "
                            f"config.json and weights on disk (a directory written by save_pretrained).")


def check_shapes(model_dir: Path, headers: dict[str, dict], by_key: dict[str, str], base: BaseArchitecture) -> None:
    """Every checkpoint tensor has the shape the base's config.json describes (else the two belong to different
    models, and the merged directory would not load). `by_key`: checkpoint key -> 5.x parameter name."""
    wrong = []
    for shard, header in headers.items():
        for key, entry in header.items():
            name = by_key.get(key)
            expected = base.parameters.get(name) if name else None
            if expected is not None and list(expected) != list(entry["shape"]):
                wrong.append(f"{key} is {tuple(entry['shape'])} in {shard}, config.json implies {tuple(expected)}")
    if wrong:
        raise MMTuningError(f"{model_dir}: its weights do not match its config.json ({'; '.join(wrong[:3])}"
                            f"{f'; and {len(wrong) - 3} more' if len(wrong) > 3 else ''}): the two come from different "
                            f"models or sizes. Restore the model's own config.json (or weights) and run again.")


def parse_dtype(name: str) -> Optional[torch.dtype]:
    if name not in DTYPES:
        raise MMTuningError(f"--dtype {name!r}: write one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def checkpoint_files(model_dir: Path) -> tuple[dict[str, str], Optional[dict[str, Any]]]:
    """key -> shard file name, and the index JSON (None for a single-file checkpoint)."""
    index_path, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            return dict(index["weight_map"]), index
        except (json.JSONDecodeError, KeyError) as error:
            raise MMTuningError(f"{index_path} is not a valid safetensors index ({error}); re-download the model.") from None
    if single.is_file():
        return {k: SINGLE_FILE for k in read_header(single)[0]}, None
    raise MMTuningError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}; --base must be a model directory "
                        f"saved with safetensors (save_pretrained writes one).")


def key_spelling(names: list[str], keys: set[str], family: LayoutFamily, model_dir: Path) -> tuple[str, ...]:
    """Which prefix spelling the checkpoint uses for 5.x parameter names (transformers 5 saves some legacy ones)."""
    for combo in CHECKPOINT_SPELLINGS:
        if all(spell(n, family, combo) in keys for n in names):
            return combo
    missing = [n for n in names if n not in keys][:5]
    raise MMTuningError(f"{model_dir} does not hold the weights the adapter changes (e.g. {', '.join(missing)}); "
                        f"it is not the adapter's base model. Pass the base model directory the adapter was trained on.")


def _quantized_weights(base: BaseArchitecture, four_bit: FourBit) -> list[str]:
    return [f"{name}.weight" for name, module in base.modules.items()
            if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith("." + s) or name.startswith(s + ".")
                                                             for s in four_bit.skip)]


def merge_into(model_dir: Path, out: Path, base: BaseArchitecture, adapter: Adapter, dtype: Optional[torch.dtype],
               four_bit: Optional[FourBit] = None, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Stream the checkpoint in `model_dir` into `out` with the 5.x-named `adapter` merged in.

    `device` only hosts the additions (and the 4-bit round trip): shards are read and written on the CPU."""
    from tqdm.auto import tqdm

    weight_map, index = checkpoint_files(model_dir)
    family = base.family
    deltas = {f"{m}.weight": f for m, f in adapter.modules.items()}
    replaced = {extra_param_name(k): t for k, t in adapter.extra.items()}
    quantized = _quantized_weights(base, four_bit) if four_bit else []
    combo = key_spelling(list(deltas) + list(replaced), set(weight_map), family, model_dir)
    by_key = {spell(n, family, combo): n for n in list(deltas) + list(replaced) + quantized}
    shards = sorted(set(weight_map.values()))
    headers = {shard: read_header(model_dir / shard)[0] for shard in shards}
    check_shapes(model_dir, headers, {spell(n, family, combo): n for n in base.parameters}, base)
    counts = {"merged": 0, "roundtripped": 0}

    def produce(handle, entry, data_start, name):
        def make() -> torch.Tensor:
            tensor = read_tensor(handle, entry, data_start)
            if name in replaced:  # a modules_to_save copy, or the saved base of a LoRA'd lm_head (delta below)
                tensor = replaced[name].to(tensor.dtype)
            if name is not None and tensor.is_floating_point():
                original = tensor.dtype
                if four_bit and name in quantized and name not in replaced:
                    tensor = roundtrip_4bit(tensor.to(device), four_bit.quant_type, four_bit.blocksize,
                                            four_bit.double_quant).cpu()
                    counts["roundtripped"] += 1
                if name in deltas:
                    delta = deltas[name].delta().to(device).view(tensor.shape)
                    tensor = (tensor.to(device).float() + delta).to(original).cpu()
                    counts["merged"] += 1
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return make

    total_size = 0
    for shard in tqdm(shards, desc="merging shards", unit="shard", disable=not progress):
        header, metadata, data_start = read_header(model_dir / shard)
        with open(model_dir / shard, "rb") as handle:
            plan = []
            for key, entry in header.items():
                stored = STORED_DTYPES[entry["dtype"]]
                out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
                plan.append((key, out_dtype, entry["shape"], produce(handle, entry, data_start, by_key.get(key))))
            total_size += write_streaming(out / shard, plan, metadata or {"format": "pt"})
    merged, roundtripped = counts["merged"], counts["roundtripped"]
    if merged != len(deltas):
        raise MMTuningError(f"merged {merged} of {len(deltas)} adapted weights; the checkpoint index of {model_dir} "
                            f"does not match its shards. Re-download the model.")
    _copy_side_files(model_dir, out, index, total_size, dtype)
    return {"merged_modules": merged, "replaced_tensors": len(replaced), "shards": len(shards),
            "dequantized_4bit_weights": roundtripped, "bytes_written": total_size}


def _copy_side_files(model_dir: Path, out: Path, index: Optional[dict[str, Any]], total_size: int,
                     dtype: Optional[torch.dtype]) -> None:
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            shutil.copy2(item, out / item.name)
    if index is not None:
        index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total_size}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if dtype is not None and (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        for holder in [config] + [v for v in config.values() if isinstance(v, dict)]:
            for key in ("dtype", "torch_dtype"):
                if key in holder:
                    holder[key] = name
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def adapter_for_base(adapter_dir: Path, model_dir: Optional[str], source: Optional[str]) -> tuple[Adapter, BaseArchitecture]:
    """The adapter renamed into the 5.x layout and verified against its base."""
    from .layouts import check_layout

    adapter = read_adapter(Path(adapter_dir))
    base = load_base(adapter, model_dir)
    layout = check_layout(source, "--from") if source else detect_layout(adapter, base)
    current = renamed_adapter(adapter, base.family, layout, CURRENT)
    verify(current, base, f"{adapter_dir} (layout {layout})")
    return current, base


def merge(adapter_dir: Path, base_dir: Path, out: Path, dtype: str = "auto", four_bit: Optional[FourBit] = None,
          force: bool = False, source: Optional[str] = None, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    base_dir = Path(base_dir)
    torch_dtype = parse_dtype(dtype)
    device = str(check_device(device))
    if four_bit is not None:
        check_four_bit(four_bit)
    check_model_dir(base_dir, "--base")
    adapter, base = adapter_for_base(adapter_dir, str(base_dir), source)
    with safe_output(Path(out), force, (Path(adapter_dir), base_dir)) as temp:
        report = merge_into(base_dir, temp, base, adapter, torch_dtype, four_bit, progress, device)
    return {"command": "merge", "adapter": str(adapter_dir), "base": str(base_dir), "out": str(out),
            "model_type": base.model_type, "dtype": dtype,
            "four_bit": None if four_bit is None else four_bit.__dict__, **report}
