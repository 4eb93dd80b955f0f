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
    qplan = plan_quantization(base, policy, layout)
    quantized = set(qplan.quantized)
    dtype_bytes = DTYPE_BYTES[dtype]
    rows = {m: {"weight_bytes": 0, "quantized_modules": 0, "kept_16bit_modules": 0} for m in MODALITIES}
    linears = quantizable_linears(base)
    linear_weights = {id(m.weight) for m in linears.values()}
    for name, module in linears.items():
        row = rows[qplan.modality[name]]
        precision = policy.precisions()[qplan.modality[name]] if name in quantized else "none"
        row["weight_bytes"] += linear_weight_bytes(module.out_features, module.in_features, precision, policy, dtype_bytes)
        row["quantized_modules" if name in quantized else "kept_16bit_modules"] += 1
        if module.bias is not None:
            row["weight_bytes"] += module.out_features * dtype_bytes
    seen = set(linear_weights)
    for name, param in base.named_parameters():
        if id(param) in seen or is_adapter_parameter(name):
            continue
        seen.add(id(param))
        if name.endswith(".bias") and name[: -len(".bias")] in linears:
            continue
        owner = modality_by_map(name, layout.modality_map) or "language"
        rows[owner]["weight_bytes"] += param.numel() * dtype_bytes
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
