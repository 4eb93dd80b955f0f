"""Per-modality quantization: a policy says which parts of a VLM load in 4-bit (or 8-bit) and which stay 16-bit.

Hosts quantize a VLM's vision tower and projector to NF4 by default, which hurts vision quality (Qwen2-VL-2B
misdescribed an image with every layer NF4 and described it right with ~10% of weights kept 16-bit; see
docs/quantization.md). A `QuantPolicy` (the `quant:` key of the `mmtuning:` block) names a precision per
modality plus the modules kept 16-bit on purpose (projector, patch embedding, first/last vision block,
cross-attention layers). From it and the model's module tree this package derives (one module per concern):

- `plan.bnb_config_kwargs`: the exact `BitsAndBytesConfig` kwargs, with an `llm_int8_skip_modules` list of
  anchored full module names (transformers 5.20+ matches entries with `re.match` at a module boundary or
  `endswith`; a bare `vision_tower` does not match `model.vision_tower...`);
- `verify.verify_quantized`: after loading, which Linear modules really are 4-bit, and a loud error when that
  differs from the policy;
- `kbit.prepare_kbit_training`: k-bit training preparation that leaves frozen 16-bit towers in 16-bit;
- `memory.memory_estimate`: weight bytes after quantization per modality, trainable and optimizer bytes.

The policy itself (`QuantPolicy`, presets) is schema and lives in config.py; `policy.py` reads it from a config;
bitsandbytes specifics (storage layout, config kwargs, packed types) live in `bnb.py` alone.
"""

from __future__ import annotations

from ..config import FOUR_BIT, PRESETS, QuantPolicy
from .bnb import allocated_weight_bytes, bnb_kwargs_for_plan, linear_weight_bytes, precision_of
from .kbit import prepare_kbit_training
from .memory import memory_estimate
from .plan import QuantPlan, bnb_config_kwargs, plan_quantization, quantizable_linears
from .policy import load_policy, policy_of
from .verify import QuantMismatchError, check_modules_to_save, quantization_report, verify_quantized

__all__ = ["FOUR_BIT", "PRESETS", "QuantMismatchError", "QuantPlan", "QuantPolicy", "allocated_weight_bytes",
           "bnb_config_kwargs", "bnb_kwargs_for_plan", "check_modules_to_save", "linear_weight_bytes", "load_policy",
           "memory_estimate", "plan_quantization", "policy_of", "precision_of", "prepare_kbit_training",
           "quantizable_linears", "quantization_report", "verify_quantized"]
