"""The base view of a model: its adapters switched off, and 4-bit forwards without grad that stay trainable.

One home for two low-level facts that keep, eval, the anchor loss, the probe, the session and the test builders
all rely on:
- PEFT layers carry a `_disable_adapters` flag; flipping it on a subtree gives the frozen base's output of that
  subtree without touching the adapter weights (`adapters_disabled`).
- bitsandbytes (0.50) repacks a CPU `Linear4bit` weight in place into an AVX512-BF16 inference layout the first
  time the layer runs in eval mode on an input without grad, on CPUs that have AVX512-BF16 (AMD EPYC, recent
  Xeons). Small layers then fail outright (`shape '[32, 0]' is invalid`) and any layer fails in training
  afterwards. Which CPU a run lands on must not decide whether it works, so every model mmtuning touches keeps
  the trainable layout (`keep_cpu_4bit_layout`, for the model's life; `cpu_4bit_repack_off`, for one block).
Beside them, how a batch meets such a forward (`to_model`: the model's device and compute dtype).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Disable every PEFT adapter layer inside `module` only (LoRA layers, ParamWrapper, modules_to_save)."""
    layers = [m for m in module.modules() if hasattr(m, "_disable_adapters")]
    before = [m._disable_adapters for m in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, value in zip(layers, before):
            layer._disable_adapters = value


def has_adapters(module: nn.Module) -> bool:
    return any(hasattr(m, "_disable_adapters") for m in module.modules())


def linear_4bit_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def keep_cpu_4bit_layout(model: nn.Module) -> int:
    """Turn bitsandbytes' CPU inference repacking off for every 4-bit layer of `model`, for good (a model being
    trained or evaluated mid-training must keep the layout training needs; CPU inference is a little slower).
    Returns how many layers it covered."""
    layers = linear_4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


@contextmanager
def cpu_4bit_repack_off(model: nn.Module) -> Iterator[None]:
    """The same for one block of eval-mode no-grad forwards (generation, a probe, scoring), restored after."""
    layers = linear_4bit_layers(model)
    before = [getattr(m, "support_avx512bf16_for_cpu", False) for m in layers]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.support_avx512bf16_for_cpu = value


def repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of 4-bit layers bitsandbytes has repacked into its CPU inference layout (tests assert this is [])."""
    layers = set(linear_4bit_layers(model))
    return [name for name, m in model.named_modules() if m in layers
            and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]


def to_model(batch: dict, model: nn.Module) -> dict:
    """On the model's device; floating tensors (pixels) in the model's compute dtype."""
    import torch

    parameter = next(model.parameters())
    dtype = getattr(model, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    return {k: v.to(parameter.device, dtype=dtype if v.is_floating_point() and dtype else None)
            for k, v in batch.items()}
