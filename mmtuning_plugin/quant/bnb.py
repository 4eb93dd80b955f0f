"""bitsandbytes specifics, in one place: its 4-bit storage layout (for the memory estimate), the
`BitsAndBytesConfig` kwargs of a quantization plan, how a loaded module or weight tells its precision, the
bytes a loaded model really holds (quantization constants included), and the 4-bit round trip a merge applies."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..arch import unwrap
from ..config import FOUR_BIT, QuantPolicy
from ..errors import MMTuningError

# bitsandbytes' 4-bit layout (0.50): blocks of 64 weights, one absmax per block (uint8 with double quant,
# fp32 without), a 16-entry fp32 code; double quant adds an fp32 absmax per 256 blocks, a 256-entry fp32
# code and an fp32 offset. Facts used by the memory estimate, checked against a loaded model in tests.
BNB_BLOCKSIZE = 64

BNB_NESTED_BLOCKSIZE = 256

BNB_CODE_BYTES = 16 * 4

BNB_NESTED_CODE_BYTES = 256 * 4 + 4
# quantize_4bit accepts these block sizes (0.50; other values raise "invalid blocksize").
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Parameter and module classes of packed (quantized) weights.
PACKED_PARAMETERS = ("Params4bit", "Int8Params")


def precision_of(module: nn.Module) -> str:
    """`4bit`, `8bit` or `16bit` for a (possibly PEFT-wrapped) Linear."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__ if weight is not None else ""
    if kind == PACKED_PARAMETERS[0] or type(module).__name__ == "Linear4bit":
        return "4bit"
    if kind == PACKED_PARAMETERS[1] or type(module).__name__ == "Linear8bitLt":
        return "8bit"
    return "16bit"


def bnb_kwargs_for_plan(plan: Any) -> dict[str, Any] | None:
    """`BitsAndBytesConfig(**kwargs)` for a `plan.QuantPlan` (policy, quantized names, skip list); None at `none`."""
    policy = plan.policy
    if policy.quant_type is None:
        return None
    if not plan.quantized:
        raise MMTuningError(
            f"mmtuning.quant asks for {policy.quant_type} ({', '.join(f'{m}: {p}' for m, p in policy.precisions().items())}) "
            f"but every Linear it would quantize is kept 16-bit by the keep_* settings; quantize more (e.g. "
            f"`quant: balanced`) or write `quant: none`.")
    if policy.quant_type == "int8":
        return {"load_in_8bit": True, "llm_int8_skip_modules": plan.skip_modules}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": policy.quant_type,
        "bnb_4bit_use_double_quant": policy.double_quant,
        "bnb_4bit_compute_dtype": policy.compute_dtype,
        "bnb_4bit_quant_storage": policy.storage_dtype,
        "llm_int8_skip_modules": plan.skip_modules,
    }


def linear_weight_bytes(out_features: int, in_features: int, precision: str, policy: QuantPolicy,
                        dtype_bytes: int) -> int:
    """Bytes a Linear weight takes: packed 4-bit data plus quantization constants, 8-bit, or 16-bit."""
    n = out_features * in_features
    if precision in FOUR_BIT:
        blocks = math.ceil(n / BNB_BLOCKSIZE)
        constants = BNB_CODE_BYTES
        if policy.double_quant:
            constants += blocks + math.ceil(blocks / BNB_NESTED_BLOCKSIZE) * 4 + BNB_NESTED_CODE_BYTES
        else:
            constants += blocks * 4
        return math.ceil(n / 2) + constants
    if precision == "int8":
        return n + out_features * 4  # int8 weight plus one fp32 scale per row
    return n * dtype_bytes


def allocated_weight_bytes(model: nn.Module) -> int:
    """Bytes really held by a loaded model's weights and quantization constants (shared storages counted once)."""
    seen: set[int] = set()
    total = 0

    def add(tensor):
        nonlocal total
        if tensor is None or not torch.is_tensor(tensor) or tensor.device.type == "meta":
            return
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        total += tensor.untyped_storage().nbytes()

    for param in unwrap(model).parameters():
        add(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            if getattr(state, "nested", False):
                add(state.state2.absmax)
                add(state.state2.code)
    return total


def float_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (possibly 4-bit packed) weight as a detached float32 tensor: packed ones dequantized once."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(torch.float32)
    return weight.detach().to(torch.float32)


def original_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a weight had before 4-bit packing (its own dtype when not packed)."""
    quant_state = getattr(weight, "quant_state", None)
    return quant_state.dtype if quant_state is not None else weight.dtype


def roundtrip_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BNB_BLOCKSIZE,
                   double_quant: bool = True) -> torch.Tensor:
    """The weight as a bitsandbytes 4-bit layer computes with it (quantize, then dequantize): what a QLoRA
    adapter was trained against, so a merge adds its delta to this rather than to the 16-bit original."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)
