"""PEFT LoRA adapter directories as data: read, write (atomically), group tensors per module, compute deltas.

Keys look like `base_model.model.<module>.lora_A.weight` (PEFT strips the adapter name on save); other
tensors (modules_to_save copies, trainable tokens) are carried as `extra` tensors keyed by their full key.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MMTuningError
from ..files import read_json_object

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# factor tensor suffixes: (A, B) pairs per module kind
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_A\.bias|lora_B\.bias|lora_magnitude_vector(\.weight)?)$")


@dataclass
class Factors:
    """One module's LoRA pair: delta = scaling * B @ A (transposed for embeddings)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a, b = self.a.to(dtype).flatten(1), self.b.to(dtype).flatten(1)
        product = (b @ a) * self.scaling
        return product.T if self.embedding else product


@dataclass
class Adapter:
    path: Path | None
    config: dict[str, Any]
    modules: dict[str, Factors]  # module name (no PEFT prefix) -> factors
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # full keys of non-LoRA tensors

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for module, f in self.modules.items():
            a_key, b_key = FACTOR_SUFFIXES[1 if f.embedding else 0]
            out[PREFIX + module + a_key] = f.a.contiguous()
            out[PREFIX + module + b_key] = f.b.contiguous()
        out.update({k: v.contiguous() for k, v in self.extra.items()})
        return out


def rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """PEFT's rule: the first rank_pattern/alpha_pattern key matching `(.*\\.)?(key)$` wins, else r/lora_alpha."""
    def pick(patterns: dict[str, Any], default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default
    return pick(config.get("rank_pattern"), config.get("r", 8)), pick(config.get("alpha_pattern"), config.get("lora_alpha", 8))


def scaling_for(config: dict[str, Any], rank: int, alpha: float) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(path: Path) -> Adapter:
    """Load an adapter dir; every problem (missing files, corrupt safetensors, rank mismatch) is an MMTuningError."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if path.is_file():
        raise MMTuningError(f"{path} is a file; pass the adapter's directory ({path.parent if path.name in (CONFIG_FILE, WEIGHTS_FILE) else 'the folder written by `save_pretrained`'}), "
                            f"which holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
    if not path.is_dir():
        raise MMTuningError(f"{path}: no such directory; pass a PEFT adapter directory (the folder written by "
                            f"`save_pretrained`, with {CONFIG_FILE} and {WEIGHTS_FILE}).")
    if not config_path.exists():
        raise MMTuningError(f"{path} is not a PEFT adapter directory: {CONFIG_FILE} is missing. Point at the folder "
                            f"written by `save_pretrained` (it holds {CONFIG_FILE} and {WEIGHTS_FILE}).")
    config = check_adapter_config(read_json_object(config_path, str(config_path), f"the {CONFIG_FILE} written by `save_pretrained` in training"),
                                  config_path)
    if not weights_path.is_file():
        other = [p.name for p in path.glob("adapter_model.*")]
        hint = f" (found {', '.join(other)}: re-save with safe_serialization=True)" if other else ""
        raise MMTuningError(f"{weights_path} is missing{hint}; mmtune convert reads safetensors adapters only.")
    if config.get("peft_type", "LORA") != "LORA":
        raise MMTuningError(not_lora(path, config.get("peft_type")))
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise MMTuningError(f"{weights_path} is truncated or corrupt ({error}); the file on disk is not a complete "
                            f"safetensors file. Copy it again from where the adapter was trained.") from None
    return split_tensors(path, config, tensors)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _names(v) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(i, str) for i in v))


def _pattern(check):
    return lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items()))


# adapter_config.json fields convert reads: key -> (valid?, what PEFT writes there). Absent keys take PEFT defaults.
ADAPTER_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (_whole, "a whole number >= 1, the rank used in training"),
    "lora_alpha": (_number, "a positive number, the alpha used in training"),
    "rank_pattern": (_pattern(_whole), "a mapping of module name -> rank, or {}"),
    "alpha_pattern": (_pattern(_number), "a mapping of module name -> alpha, or {}"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "peft_type": (lambda v: isinstance(v, str), "a PEFT type name such as \"LORA\""),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "the base model's directory or hub id"),
    "target_modules": (_names, "a list of module names or one regex"),
    "exclude_modules": (_names, "a list of module names or one regex"),
    "modules_to_save": (_names, "a list of module names"),
}


def not_lora(path: Path, peft_type: str) -> str:
    """Why convert refuses an adapter of another method: the method's own reason where it is a registered one."""
    from ..methods import method_by_peft_type

    found = method_by_peft_type(peft_type)
    reason = (f"it was trained with method: {found[0]}, and {found[1].not_convertible}" if found else
              "mmtune convert works on LoRA deltas (lora_A/lora_B per weight)")
    return f"{path}: peft_type is {peft_type}; {reason}. Train with method: lora to merge, export or combine."


def check_adapter_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """Refuse fields of the wrong type (a null lora_alpha, a string rank) before any arithmetic uses them."""
    wrong = [f"{key}: {json.dumps(config[key])} (write {expected})"
             for key, (valid, expected) in ADAPTER_FIELDS.items() if key in config and not valid(config[key])]
    if wrong:
        raise MMTuningError(f"{where} has invalid values: {'; '.join(wrong)}. Restore the file written by "
                            f"`save_pretrained` in training.")
    return config


def split_tensors(path: Path | None, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Adapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _FACTOR.match(key)
        if not match:
            extra[key] = tensor
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    modules: dict[str, Factors] = {}
    for full, found in parts.items():
        module = full[len(PREFIX):] if full.startswith(PREFIX) else full
        if any(p.startswith("lora_magnitude") for p in found) or config.get("use_dora"):
            raise MMTuningError(f"{path}: module {module} is a DoRA module; mmtune convert handles plain LoRA only "
                                f"(DoRA's magnitude vector cannot be expressed as B@A).")
        if any(p.endswith("bias") for p in found):
            raise MMTuningError(f"{path}: module {module} has a LoRA bias (lora_bias=True); not supported by mmtune convert.")
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a = found.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = found.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a is None or b is None:
            raise MMTuningError(f"{path}: module {module} has only {', '.join(found)}; its LoRA pair is incomplete. "
                                f"The adapter file is damaged or was edited; re-export it.")
        if a.shape[0] != b.shape[1]:
            raise MMTuningError(f"{path}: module {module} has mismatched ranks: A is {tuple(a.shape)} (rank {a.shape[0]}), "
                                f"B is {tuple(b.shape)} (rank {b.shape[1]}). The file mixes two adapters; re-export it.")
        rank, alpha = rank_alpha(config, module)
        if rank != a.shape[0]:
            raise MMTuningError(f"{path}: module {module} has rank {a.shape[0]} in the weights but {rank} in "
                                f"{CONFIG_FILE} (r / rank_pattern); the config does not belong to these weights.")
        modules[module] = Factors(a, b, scaling_for(config, rank, alpha), embedding)
    if not modules:
        raise MMTuningError(f"{path}: {WEIGHTS_FILE} holds no LoRA tensors (keys like {PREFIX}<module>.lora_A.weight).")
    return Adapter(path, config, modules, extra)


def explicit_config(template: dict[str, Any], adapter_modules: dict[str, Factors]) -> dict[str, Any]:
    """An adapter_config for factors whose scaling was folded in (scaling 1): r = most common rank, alpha = r."""
    ranks = [f.rank for f in adapter_modules.values()]
    common = max(set(ranks), key=ranks.count)
    config = dict(template)
    config.update(r=common, lora_alpha=common, use_rslora=False, use_dora=False, layers_to_transform=None,
                  layers_pattern=None, exclude_modules=None, target_modules=sorted(adapter_modules),
                  rank_pattern={re.escape(m): f.rank for m, f in adapter_modules.items() if f.rank != common},
                  alpha_pattern={re.escape(m): f.rank for m, f in adapter_modules.items() if f.rank != common})
    return config


def folded(factors: Factors, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Factors:
    return Factors(a.to(dtype).contiguous(), b.to(dtype).contiguous(), 1.0, factors.embedding)


def factors_from_delta(delta: torch.Tensor, rank: int, embedding: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A, B) of a dense delta via SVD, plus all singular values (for the error)."""
    matrix = delta.T if embedding else delta  # B @ A orientation
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], s


def lowrank_svd(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of scaling * B @ A through QR of the thin factors: U, S, Vh of rank <= r without the dense matrix."""
    a, b = f.a.float().flatten(1), f.b.float().flatten(1) * f.scaling
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def write_adapter(adapter: Adapter, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    save_file(adapter.tensors(), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if adapter.path is not None:  # carry the README/tokenizer files that sit beside the adapter
        for item in adapter.path.iterdir():
            if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE) and not item.name.startswith("."):
                shutil.copy2(item, out / item.name)
