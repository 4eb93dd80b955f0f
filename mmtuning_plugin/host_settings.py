"""A host's own LoRA settings next to an `mmtuning:` block: one rule for Axolotl and LLaMA-Factory.

A user's host YAML already says `lora_r: 32`, `lora_alpha: 16`, `lora_dropout: 0.05` and names targets. Adding
the block must not change what those mean: the host's values are the defaults of the block's `r`, `alpha`,
`dropout` (and DoRA/rsLoRA switches) where the block leaves them unset; the host's target keys are replaced by
the plan, with one warning; only a real contradiction (block and host both set, differently) is refused, every
one in one message. Each host file names its keys in a `HostKeys` row and calls these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .errors import MMTuningError

if TYPE_CHECKING:
    from .config import MMTuningConfig
    from .targets import TargetPlan

MODALITIES = ("vision", "projector", "language")


@dataclass(frozen=True)
class HostKeys:
    """One host's names: block key -> host key for the defaults, the host keys the plan replaces, what the
    host itself offers instead of mmtuning's k-bit preparation (which runs only in the transformers Trainer), and
    the keys naming the model (first set one wins)."""

    host: str
    defaults: dict[str, str]
    targets: tuple[str, ...]
    kbit_instead: str
    model: tuple[str, ...] = ()


AXOLOTL = HostKeys("Axolotl", {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                               "use_dora": "peft_use_dora", "use_rslora": "peft_use_rslora"},
                   ("lora_target_modules", "lora_target_linear"),
                   "Axolotl runs PEFT's prepare_model_for_kbit_training itself; use its `gradient_checkpointing: true`",
                   ("base_model_config", "base_model"))
LLAMAFACTORY = HostKeys("LLaMA-Factory", {"r": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                          "use_dora": "use_dora", "use_rslora": "use_rslora"},
                        ("lora_target",),
                        "LLaMA-Factory prepares the model itself; use its `disable_gradient_checkpointing` and "
                        "`upcast_layernorm`", ("model_name_or_path",))
# `quant:` settings that only mmtuning's own k-bit preparation applies (quant/kbit.py, called by the transformers
# Trainer integration): a host that prepares the model itself would accept and drop them, so they are refused.
KBIT_ONLY = ("checkpoint_vision", "checkpoint_language", "checkpoint_reentrant", "fp32_norms", "upcast_16bit")


def unset(value: Any) -> bool:
    """A host key the user did not really set (Axolotl's schema fills absent booleans with None or False)."""
    return value is None or value is False or value == [] or value == {} or value == ""


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def with_host_defaults(block: Mapping[str, Any] | None, settings: Mapping[str, Any], keys: HostKeys,
                       conflicts: list[str]) -> dict[str, Any]:
    """The block with the host's values where it leaves them unset; contradictions are appended to `conflicts`."""
    block = plain(block or {})
    taken = []
    for ours, theirs in keys.defaults.items():
        value = settings.get(theirs)
        if value is None or (value is False and ours.startswith("use_")):
            continue
        if ours not in block or block[ours] is None:
            block[ours] = value
            taken.append(ours)
        elif not same(block[ours], value):
            conflicts.append(f"`{theirs}: {value}` vs `mmtuning.{ours}: {block[ours]}` (keep one)")
    if "dropout" in taken and block["dropout"]:
        conflicts += filter(None, [dropout_without_a_place(block, settings, keys)])
    return block


def dropout_without_a_place(block: dict[str, Any], settings: Mapping[str, Any], keys: HostKeys) -> Optional[str]:
    """The host's dropout where the plan adapts a bare projector weight (Gemma 3), which PEFT's target_parameters
    wrapper cannot drop out: named as the host key the user wrote, not as the block's `dropout` the plan would
    name. Only model types whose map has bare projector weights are planned here (on the meta device); a model
    or block that cannot be read is left to the host's own checks, which run next."""
    from .arch import registered_maps
    from .loading import build_skeleton, load_model_config
    from .targets import plan_targets

    name = next((str(settings.get(key)) for key in keys.model if settings.get(key)), None)
    if name is None:
        return None
    try:
        model_config = load_model_config(name)
        modality_map = registered_maps().get(model_config.model_type)
        if modality_map is None or not modality_map.projector_parameters:
            return None
        plan = plan_targets(build_skeleton(model_config), {**block, "dropout": 0.0})
    except (OSError, ValueError):  # MMTuningError included: the host loads the model and the block next, and says
        return None
    if not plan.parameters:
        return None
    host_key = keys.defaults["dropout"]
    return (f"`{host_key}: {block['dropout']}` ({model_config.model_type}'s projector is the bare weight "
            f"{plan.parameters[0].name}, and PEFT's target_parameters wrapper that adapts it has no dropout; write "
            f"`{host_key}: 0` or remove it, or keep the dropout for the other modules by training the projector "
            f"whole, `mmtuning.projector: {{full: true}}`, or not at all, `mmtuning.projector: false`)")


def plain(value: Any) -> Any:
    """Nested mappings as plain dicts: Axolotl's DictDefault returns None for any missing attribute, which breaks
    pydantic's serialization of the block once it sits inside a plain dict."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def replaced_targets(settings: Mapping[str, Any], keys: HostKeys) -> list[str]:
    """The host's target keys the user set: the plan replaces them (warned about once, never refused)."""
    return [f"{key}: {settings.get(key)}" for key in keys.targets if not unset(settings.get(key))]


def kbit_settings_not_applied(config: "MMTuningConfig", keys: HostKeys) -> list[str]:
    """The block's k-bit preparation settings the user wrote: the host would never apply them."""
    written = sorted(set(KBIT_ONLY) & (config.quant.model_fields_set if config.quant is not None else set()))
    return [f"`mmtuning.quant.{key}` (never applied in {keys.host}: {keys.kbit_instead}; remove it, or train "
            f"with the transformers Trainer integration, which applies it)" for key in written]


def refuse(conflicts: list[str], where: str, host: str) -> None:
    """Every contradiction in one message, or nothing."""
    if conflicts:
        raise MMTuningError(f"{where}: these {host} settings contradict the `mmtuning:` block: "
                            + "; ".join(conflicts) + f". {host}'s LoRA rank/alpha/dropout are the block's defaults "
                            f"where it leaves them unset, so each needs writing only once.")


def describe_plan(plan: "TargetPlan") -> str:
    """`vision 8 (r=4), projector 2 (r=8), language 28 (r=8)`: one log line a user can check."""
    parts = []
    for modality in MODALITIES:
        count = len(plan.modules_of(modality)) + len(plan.parameters_of(modality))
        if count:
            parts.append(f"{modality} {count} (r={plan.config.rank(modality)})")
    if plan.modules_to_save:
        parts.append(f"trained whole: {', '.join(plan.modules_to_save)}")
    return ", ".join(parts)


def targets_warning(given: list[str], plan: "TargetPlan", host: str) -> str:
    size = len(plan.target_modules) + len(plan.target_parameters)
    return (f"{'; '.join(given)}: {host}'s LoRA targets are replaced by the mmtuning plan ({size} targets: "
            f"{describe_plan(plan)}); choose targets with mmtuning.vision/projector/language .modules and .layers, "
            f"or remove the key to silence this warning.")


def effective_settings(config: "MMTuningConfig") -> str:
    """`vision r=4 alpha=2, projector r=32 alpha=16, language r=32 alpha=16, dropout 0.05`: what each modality trains with."""
    parts = [f"{m} r={config.rank(m)} alpha={config.scale_alpha(m):g}" for m in MODALITIES if config.spec(m).enabled]
    if config.dropout is not None:
        parts.append(f"dropout {config.dropout:g}")
    return ", ".join(parts)
