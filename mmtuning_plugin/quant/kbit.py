"""k-bit training preparation that leaves frozen 16-bit towers in 16-bit (PEFT's upcasts everything), runs
norms in fp32 and turns on gradient checkpointing per modality."""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from ..arch import ModelLayout, resolve_layout, unwrap
from ..config import QuantPolicy
from ..errors import MMTuningError
from .bnb import PACKED_PARAMETERS
from .policy import policy_of


NORM_CLASS = re.compile(r"(LayerNorm|RMSNorm|GroupNorm|Norm)$")


def prepare_kbit_training(model: nn.Module, config: Any) -> dict[str, Any]:
    """Prepare a quantized model for adapter training without PEFT's fp32 upcast of everything.

    Freezes every weight; leaves frozen 16-bit towers in 16-bit (unless `upcast_16bit`); runs norms in fp32;
    turns on gradient checkpointing per modality; enables input gradients where reentrant checkpointing needs
    them. Returns what it did, for logs and tests.
    """
    policy = policy_of(config) or QuantPolicy.model_validate("none")
    base = unwrap(model)
    layout = resolve_layout(base)
    for param in base.parameters():
        param.requires_grad_(False)
    upcast = 0
    if policy.upcast_16bit:
        for param in base.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in PACKED_PARAMETERS:
                param.data = param.data.float()
                upcast += param.numel()
    norms = _fp32_norms(base) if policy.fp32_norms else []
    checkpointed = {}
    for modality, wanted in (("vision", policy.checkpoint_vision), ("language", policy.checkpoint_language)):
        if wanted:
            checkpointed[modality] = _enable_checkpointing(base, layout, modality, policy.checkpoint_reentrant)
    input_grads = []
    if checkpointed and policy.checkpoint_reentrant:
        input_grads = _enable_input_grads(base, layout, list(checkpointed))
    return {"upcast_params": upcast, "fp32_norms": norms, "checkpointed": checkpointed, "input_grads": input_grads}


def _fp32_norms(model: nn.Module) -> list[str]:
    """Norm layers compute in fp32 (weights cast up, input cast up, output cast back to the input dtype)."""
    done = []
    for name, module in model.named_modules():
        if not NORM_CLASS.search(type(module).__name__) or getattr(module, "_mmtuning_fp32", False):
            continue
        own = list(module.parameters(recurse=False))
        if not own or all(p.dtype == torch.float32 for p in own):
            continue
        for param in own:
            param.data = param.data.float()
        module.register_forward_pre_hook(_upcast_input, with_kwargs=True)
        module.register_forward_hook(_downcast_output, with_kwargs=True)
        module._mmtuning_fp32 = True
        done.append(name)
    return done


def _upcast_input(module, args, kwargs):
    dtypes = [a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()]
    module._mmtuning_in_dtype = dtypes[0] if dtypes else None
    args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return args, kwargs


def _downcast_output(module, args, kwargs, output):
    dtype = getattr(module, "_mmtuning_in_dtype", None)
    if dtype is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(dtype)
    return output


def _enable_checkpointing(model: nn.Module, layout: ModelLayout, modality: str, reentrant: bool) -> int:
    from torch.utils.checkpoint import checkpoint

    func = functools.partial(checkpoint, use_reentrant=reentrant)
    count = 0
    for stack in layout.modality_map.layer_stacks(modality):
        for module in model.get_submodule(stack).modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = func
                module.gradient_checkpointing = True
                count += 1
    if count == 0:
        raise MMTuningError(
            f"mmtuning.quant.checkpoint_{modality}: the {modality} layers of '{layout.model_type}' "
            f"({', '.join(layout.modality_map.layer_stacks(modality))}) do not support gradient checkpointing in this "
            f"transformers; set checkpoint_{modality}: false.")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return count


def _enable_input_grads(model: nn.Module, layout: ModelLayout, modalities: list[str]) -> list[str]:
    """Reentrant checkpointing drops gradients unless a checkpointed block's input requires grad."""
    hooked = []
    for modality in modalities:
        stacks = layout.modality_map.layer_stacks(modality)
        first = model.get_submodule(stacks[0])[0]
        first.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)
        hooked.append(f"{stacks[0]}.0")
    return hooked


def _inputs_require_grad(module, args, kwargs):
    def mark(value):
        if torch.is_tensor(value) and value.is_floating_point() and not value.requires_grad:
            return value.detach().requires_grad_(True)
        return value

    return tuple(mark(a) for a in args), {k: (mark(v) if k == "hidden_states" else v) for k, v in kwargs.items()}
