"""Per-modality quantization: a policy says which parts of a VLM load in 4-bit (or 8-bit) and which stay 16-bit.

Hosts quantize a VLM's vision tower and projector to NF4 by default, which hurts vision quality
(FACTS.md section 4). A `QuantPolicy` (the `quant:` key of the `mmtuning:` block) names a precision per
modality plus the modules kept 16-bit on purpose (projector, patch embedding, first/last vision block,
cross-attention layers). From it and the model's module tree this module derives:

- `bnb_config_kwargs`: the exact `BitsAndBytesConfig` kwargs, with an `llm_int8_skip_modules` list of
  anchored full module names (transformers 5.20+ matches entries with `re.match` at a module boundary or
  `endswith`; a bare `vision_tower` does not match `model.vision_tower...`);
- `verify_quantized`: after loading, which Linear modules really are 4-bit, and a loud error when that
  differs from the policy;
- `prepare_kbit_training`: k-bit training preparation that leaves frozen 16-bit towers in 16-bit;
- `memory_estimate`: weight bytes after quantization per modality, trainable and optimizer bytes.

The policy itself (`QuantPolicy`, presets) is schema and lives in config.py.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .arch import MODALITIES, ModelLayout, resolve_layout, unwrap
from .config import FOUR_BIT, QuantPolicy, validation_lines
from .errors import MMTuningError
from .model_config import get_dotted
from .names import is_adapter_child, is_adapter_parameter, modality_by_map, module_of

if TYPE_CHECKING:  # pragma: no cover
    from .config import MMTuningConfig
    from .targets import TargetPlan

# bitsandbytes' 4-bit layout (0.50): blocks of 64 weights, one absmax per block (uint8 with double quant,
# fp32 without), a 16-entry fp32 code; double quant adds an fp32 absmax per 256 blocks, a 256-entry fp32
# code and an fp32 offset. Facts used by the memory estimate, checked against a loaded model in tests.
BNB_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
BNB_CODE_BYTES = 16 * 4
BNB_NESTED_CODE_BYTES = 256 * 4 + 4
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter
TRAINABLE_BYTES = 8  # the fp32 adapter weight and its fp32 gradient


def policy_of(config: Any) -> QuantPolicy | None:
    """The policy of a MMTuningConfig, a QuantPolicy, a preset name, or None."""
    if config is None or isinstance(config, QuantPolicy):
        return config
    if isinstance(config, (str, dict)):
        return load_policy(config)
    return getattr(config, "quant", None)


def load_policy(value: Any, where: str = "mmtuning.quant") -> QuantPolicy:
    from pydantic import ValidationError

    try:
        return QuantPolicy.model_validate(value)
    except ValidationError as error:
        lines = validation_lines(error, where, valid=lambda loc: list(QuantPolicy.model_fields))
        raise MMTuningError("Invalid quantization settings:\n  " + "\n  ".join(lines)) from None


# --- which modules are quantized -------------------------------------------------------------------


@dataclass
class QuantPlan:
    """Every Linear transformers would quantize, split into 4-bit (or 8-bit) and kept-16-bit, with reasons."""

    policy: QuantPolicy
    modality: dict[str, str]  # Linear name -> vision | projector | language
    quantized: list[str]
    kept: dict[str, str]  # name -> why it stays 16-bit
    skip_modules: list[str] = field(default_factory=list)

    def quantized_of(self, modality: str) -> list[str]:
        return [n for n in self.quantized if self.modality[n] == modality]

    def kept_of(self, modality: str) -> list[str]:
        return [n for n in self.kept if self.modality[n] == modality]


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> Linear for every module bitsandbytes replaces (or already replaced), PEFT wrappers seen through."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if is_adapter_child(name):
            continue
        name = module_of(name)  # PEFT's ModulesToSaveWrapper keeps the original under `.original_module`
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            module = base
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[name] = module
    return found


def plan_quantization(model: nn.Module, policy: QuantPolicy, layout: ModelLayout | None = None) -> QuantPlan:
    """Decide, for every quantizable Linear of `model` (a meta skeleton or a loaded model), 4-bit or 16-bit."""
    layout = layout or resolve_layout(model)
    mmap = layout.modality_map
    linears = quantizable_linears(model)
    rules = _keep_rules(unwrap(model), layout, policy)
    used_patterns: set[str] = set()
    modality_of: dict[str, str] = {}
    quantized: list[str] = []
    kept: dict[str, str] = {}
    output_name = _output_embedding_name(model)
    for name in linears:
        modality = modality_by_map(name, mmap) or "language"
        modality_of[name] = modality
        reason = None
        if name == output_name:
            reason = "output head (lm_head) is never quantized"
        elif policy.precisions()[modality] == "none":
            reason = f"{modality}: none"
        else:
            for prefix, why in rules:
                if name == prefix or name.startswith(prefix + "."):
                    reason = why
                    break
            for pattern in policy.keep_16bit:
                if re.search(rf"(^|\.)(?:{pattern})($|\.)", name):
                    used_patterns.add(pattern)
                    reason = reason or f"keep_16bit: {pattern}"
        if reason:
            kept[name] = reason
        else:
            quantized.append(name)
    unused = [p for p in policy.keep_16bit if p not in used_patterns
              and not any(re.search(rf"(^|\.)(?:{p})($|\.)", n) for n in linears)]
    if unused:
        raise MMTuningError(
            f"mmtuning.quant.keep_16bit: {unused} match no Linear module of '{layout.model_type}'. Patterns match whole "
            f"dotted segments of full names, e.g. `attn.proj` or `blocks.7`; some names here: "
            f"{', '.join(list(linears)[:3])}, ... (`mmtune inspect-targets MODEL --quant ...` lists them).")
    plan = QuantPlan(policy, modality_of, quantized, kept)
    plan.skip_modules = _skip_list(kept, quantized, output_name)
    return plan


def _output_embedding_name(model: nn.Module) -> str:
    base = unwrap(model)
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in base.named_modules():
        if head is not None and module is head:
            return name
    return "lm_head"


def _keep_rules(model: nn.Module, layout: ModelLayout, policy: QuantPolicy) -> list[tuple[str, str]]:
    """(module prefix, reason) for the modules a policy keeps 16-bit inside quantized modalities."""
    mmap = layout.modality_map
    rules: list[tuple[str, str]] = []
    if policy.keep_patch_embed:
        rules += [(leaf.name, "patch embedding") for leaf in layout.leaves if leaf.kind == "patch_embed"]
    if policy.keep_vision_edge_blocks:
        blocks = _numbered_blocks(model, mmap.vision_layers)
        if blocks:  # "last" = the last block the projector reads (LLaVA: N-2; block N-1 feeds nothing)
            last = blocks[layout.usable_layers.get("vision", len(blocks)) - 1]
            rules += [(blocks[0], "first vision block"), (last, "last vision block the projector reads")]
    if policy.keep_cross_attention and mmap.cross_attention_layers:
        indices = get_dotted(model.config, mmap.cross_attention_layers) or []
        blocks = _numbered_blocks(model, mmap.language_layers)
        rules += [(blocks[i], f"cross-attention layer {i}") for i in indices if 0 <= i < len(blocks)]
    return rules


def _numbered_blocks(model: nn.Module, stacks: tuple[str, ...]) -> list[str]:
    names = []
    for stack in stacks:
        try:
            names += [f"{stack}.{i}" for i in range(len(model.get_submodule(stack)))]
        except AttributeError:
            continue
    return names


def _skip_list(kept: dict[str, str], quantized: list[str], output_name: str) -> list[str]:
    """The shortest list of full names covering every kept Linear and no quantized one.

    Each kept name rolls up to its highest ancestor that holds no quantized Linear, so a whole 16-bit tower is one
    entry (`model.vision_tower`) and a kept block is one entry (`model.visual.blocks.0`). Names are full and
    anchored: transformers 5.20+ matches them with `re.match` at a module boundary.
    """
    occupied = set()
    for name in quantized:
        parts = name.split(".")
        occupied.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    chosen: set[str] = {output_name}
    for name in kept:
        parts = name.split(".")
        top = name
        for i in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:i])
            if ancestor in occupied:
                break
            top = ancestor
        chosen.add(top)
    return sorted(n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n))


def bnb_kwargs_for_plan(plan: QuantPlan) -> dict[str, Any] | None:
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


def bnb_config_kwargs(config: "MMTuningConfig", model_config: Any) -> dict[str, Any] | None:
    """kwargs for `transformers.BitsAndBytesConfig(**kwargs)` under `config.quant`, or None without a policy.

    Module names come from a meta-device skeleton of `model_config`, so nothing is allocated or downloaded.
    """
    policy = policy_of(config)
    if policy is None or policy.quant_type is None:
        return None
    from .loading import build_skeleton

    return bnb_kwargs_for_plan(plan_quantization(build_skeleton(model_config), policy))


# --- verification ----------------------------------------------------------------------------------


class QuantMismatchError(MMTuningError):
    """The loaded model's 4-bit modules differ from what the policy asked for."""


def precision_of(module: nn.Module) -> str:
    """`4bit`, `8bit` or `16bit` for a (possibly PEFT-wrapped) Linear."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__ if weight is not None else ""
    if kind == "Params4bit" or type(module).__name__ == "Linear4bit":
        return "4bit"
    if kind == "Int8Params" or type(module).__name__ == "Linear8bitLt":
        return "8bit"
    return "16bit"


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


# --- k-bit training preparation -------------------------------------------------------------------

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
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in ("Params4bit", "Int8Params"):
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


# --- memory accounting ----------------------------------------------------------------------------


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
