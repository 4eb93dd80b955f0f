"""After loading: which Linear modules really are 4-bit per modality, a loud error when that differs from the
policy, and a refusal to train a packed module whole."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import MODALITIES, resolve_layout, unwrap
from ..errors import MMTuningError
from ..names import modality_by_map
from .bnb import precision_of
from .plan import plan_quantization, quantizable_linears
from .policy import policy_of


class QuantMismatchError(MMTuningError):
    """The loaded model's 4-bit modules differ from what the policy asked for."""


def quantization_report(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Per modality, which Linear modules of a loaded model are 4-bit, 8-bit and 16-bit."""
    layout = resolve_layout(model)
    report = {m: {"4bit": [], "8bit": [], "16bit": []} for m in MODALITIES}
    for name, module in quantizable_linears(model).items():
        report[modality_by_map(name, layout.modality_map) or "language"][precision_of(module)].append(name)
    return report


def verify_quantized(model: nn.Module, config: Any) -> dict[str, dict[str, list[str]]]:
    """Check that exactly the modules the policy quantizes are quantized; return `quantization_report`."""
    policy = policy_of(config)
    if policy is None:
        raise MMTuningError("verify_quantized: this mmtuning config has no `quant:` policy to check the model against.")
    plan = plan_quantization(model, policy)
    linears = quantizable_linears(model)
    want = "8bit" if policy.quant_type == "int8" else "4bit"
    should = set(plan.quantized)
    really = {n for n, m in linears.items() if precision_of(m) != "16bit"}
    missing, extra = sorted(should - really), sorted(really - should)
    if missing or extra:
        lines = []
        if extra:
            lines.append(f"quantized but the policy keeps them 16-bit ({len(extra)}): " + ", ".join(extra[:12])
                         + (" ..." if len(extra) > 12 else ""))
        if missing:
            lines.append(f"left 16-bit but the policy quantizes them ({len(missing)}): " + ", ".join(missing[:12])
                         + (" ..." if len(missing) > 12 else ""))
        raise QuantMismatchError(
            f"The loaded model's {want} modules differ from mmtuning.quant ({policy.preset or 'custom'}):\n  "
            + "\n  ".join(lines) + "\nLoad it with BitsAndBytesConfig(**mmtuning.bnb_config_kwargs(model.config)); "
            "a host that builds its own skip list (or renamed modules) causes this.")
    return quantization_report(model)


def check_modules_to_save(model: nn.Module, names: list[str], where: str = "mmtuning.projector.full") -> None:
    """Training a quantized module whole is impossible (its weight is packed integers): say what to do instead."""
    base = unwrap(model)
    for name in names:
        module = base.get_submodule(name)
        packed = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and precision_of(m) != "16bit"]
        if packed:
            raise MMTuningError(
                f"{where}: '{name}' would be trained whole (modules_to_save), but it is loaded quantized "
                f"({', '.join(f'{name}.{p}' for p in packed[:4])}). Put LoRA on it instead (remove `full: true`) or keep "
                f"it 16-bit (`quant: balanced`, or `quant: {{projector: none}}`).")
