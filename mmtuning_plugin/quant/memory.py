"""Memory after quantization per modality: weight bytes (4-bit data and constants, 8-bit, 16-bit), trainable
parameters and optimizer state, read from a meta skeleton's shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..arch import MODALITIES, resolve_layout, unwrap
from ..config import QuantPolicy
from ..names import is_adapter_parameter, modality_by_map
from .bnb import linear_weight_bytes
from .plan import plan_quantization, quantizable_linears

if TYPE_CHECKING:  # pragma: no cover
    from ..targets import TargetPlan


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter

TRAINABLE_BYTES = 8  # the fp32 adapter weight and its fp32 gradient


def memory_estimate(model: nn.Module, policy: QuantPolicy | None, plan: "TargetPlan | None" = None,
                    dtype: str = "bfloat16") -> dict[str, Any]:
    """Per modality: weight bytes after quantization, trainable parameters, optimizer-state bytes; and totals.

    Works on a meta skeleton: only shapes are read. Weights outside Linear layers (embeddings, norms, convs)
    count at `dtype`; adapters and their AdamW state at fp32.
    """
    policy = policy or QuantPolicy.model_validate("none")
    base = unwrap(model)
    layout = plan.layout if plan is not None else resolve_layout(base)
    weights, qplan = weight_bytes(base, policy, layout, dtype)
    rows = {m: {"weight_bytes": 0, "quantized_modules": 0, "kept_16bit_modules": 0} for m in MODALITIES}
    quantized = set(qplan.quantized)
    for name in quantizable_linears(base):
        rows[qplan.modality[name]]["quantized_modules" if name in quantized else "kept_16bit_modules"] += 1
    for name, (modality, size) in weights.items():
        rows[modality]["weight_bytes"] += size
    total_trainable = 0
    for modality, row in rows.items():
        trainable = (plan.trainable_params(modality) or 0) if plan is not None else 0
        row["trainable_params"] = trainable
        row["trainable_bytes"] = trainable * TRAINABLE_BYTES
        row["optimizer_state_bytes"] = trainable * ADAM_STATE_BYTES
        row["total_bytes"] = row["weight_bytes"] + row["trainable_bytes"] + row["optimizer_state_bytes"]
        total_trainable += trainable
    total = {key: sum(row[key] for row in rows.values())
             for key in ("weight_bytes", "trainable_params", "trainable_bytes", "optimizer_state_bytes", "total_bytes")}
    return {"policy": policy.preset or "custom", "precisions": policy.precisions(), "modalities": rows, "total": total,
            "skip_modules": qplan.skip_modules}


def weight_bytes(base: nn.Module, policy: QuantPolicy, layout: Any, dtype: str = "bfloat16"):
    """Each base weight's bytes after quantization, by name (a Linear's weight and bias under the module's name):
    {name: (modality, bytes)}; and the quantization plan."""
    qplan = plan_quantization(base, policy, layout)
    quantized = set(qplan.quantized)
    dtype_bytes = DTYPE_BYTES[dtype]
    out: dict[str, tuple[str, int]] = {}
    linears = quantizable_linears(base)
    for name, module in linears.items():
        precision = policy.precisions()[qplan.modality[name]] if name in quantized else "none"
        size = linear_weight_bytes(module.out_features, module.in_features, precision, policy, dtype_bytes)
        out[name] = (qplan.modality[name], size + (module.out_features * dtype_bytes if module.bias is not None else 0))
    seen = {id(m.weight) for m in linears.values()}
    for name, param in base.named_parameters():
        if id(param) in seen or is_adapter_parameter(name):
            continue
        seen.add(id(param))
        if name.endswith(".bias") and name[: -len(".bias")] in linears:
            continue
        out[name] = (modality_by_map(name, layout.modality_map) or "language", param.numel() * dtype_bytes)
    return out, qplan
