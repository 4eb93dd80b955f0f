"""Modality maps: which modules of a model are vision encoder, projector and language model.

A `ModalityMap` is data (module-name prefixes and layer stacks per model type); `resolve_layout`
applies it to a concrete model and lists every adaptable leaf module with its modality, layer and kind.
Built-in maps live in `arch/builtin.py` and are registered through the same pluggy hook a third-party
package uses. Model types without a map fall back to `detect_map`, which refuses when unsure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from ..config import MODALITIES
from ..errors import MMTuningError
from ..model_config import get_dotted, set_dotted
from .history import ONLY_CURRENT, History


# Path segments that say which sub-block of a layer a leaf belongs to.
# T5 (`SelfAttention`, `EncDecAttention`, `DenseReluDense`), OPT/BART (`fc1`/`fc2` directly in the layer) and
# BERT-style Q-Former layers (`crossattention`, `intermediate_query`/`output_query`) spell them their own way.
ATTENTION_SEGMENTS = frozenset({"self_attn", "attn", "attention", "cross_attn", "encoder_attn", "self_attention",
                                "SelfAttention", "EncDecAttention", "crossattention", "x_attn", "cross_attention"})
MLP_SEGMENTS = frozenset({"mlp", "feed_forward", "ffn", "feedforward", "fc1", "fc2", "DenseReluDense", "intermediate",
                          "output", "intermediate_query", "output_query"})

# Opt-in leaves outside the layer stacks, per modality (never targeted unless asked for by name).
EXTRA_LEAVES: dict[str, dict[str, tuple[type, ...]]] = {
    "vision": {"patch_embed": (nn.Conv2d, nn.Conv3d, nn.Linear)},
    "language": {"embed_tokens": (nn.Embedding,), "lm_head": (nn.Linear,)},
    "projector": {},
}

# Module classes PEFT's LoRA can wrap in layers (bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear).
LAYER_LEAF_TYPES: tuple[type, ...] = (nn.Linear,)


@dataclass(frozen=True)
class ModalityMap:
    """Where each modality lives in a model type's module tree (transformers 5.x names)."""

    model_types: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    vision_layers: tuple[str, ...]
    language_layers: tuple[str, ...]
    # Projectors built from bare parameters instead of nn.Linear (Gemma 3): trained via target_parameters.
    projector_parameters: tuple[str, ...] = ()
    # Config attribute naming the vision hidden state the projector reads (LLaVA: -2, so the last vision
    # layer's output never reaches the language model and adapters there would never train).
    vision_feature_layer: str | None = "vision_feature_layer"
    # Dotted config path to the list of language layers with cross-attention (kept 16-bit by quant presets).
    cross_attention_layers: str | None = None
    # Dotted config keys that repair a transformers default config that cannot be built as is
    # (`SUB_CONFIG_DEFAULT` as a value: that sub-config's class default, for a default with no vision part).
    default_config_fixes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    vision_extra: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    language_extra: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # A bridge with its own layers (BLIP-2's Q-Former): `projector.layers` selects among them; projector
    # Linear modules outside these stacks (`language_projection`) are always part of a projector selection.
    projector_layers: tuple[str, ...] = ()
    # Modules no modality owns and mmtuning never adapts, with why: audio towers of omni models (never vision
    # or language), image-generation heads, action experts. The coverage test accepts exactly these.
    excluded: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # Config attributes holding the image placeholder token id, first one set wins (losses need the mask).
    image_token: tuple[str, ...] = ("image_token_id", "image_token_index")
    # The module names in older transformers layouts (`mmtune convert` reads this; see arch/history.py).
    history: History = ONLY_CURRENT
    # Language layer stacks per `text_config.model_type`, for types built around any language model (BLIP-2
    # with OPT or Flan-T5): the matching entry replaces `language_layers` when the map meets a model.
    language_layers_by_text_model: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    # The same for the vision encoder, keyed by `vision_config` (or `encoder`) model_type.
    vision_layers_by_vision_model: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    source: str = "builtin"

    def for_config(self, config: Any) -> "ModalityMap":
        """This map with the layer stacks of `config`'s own sub-models chosen (BLIP-2's language model, a
        vision-encoder-decoder pair's encoder and decoder)."""
        from dataclasses import replace

        chosen = {}
        for field_name, table, sub_configs in (
                ("language_layers", self.language_layers_by_text_model, ("text_config", "decoder")),
                ("vision_layers", self.vision_layers_by_vision_model, ("vision_config", "encoder"))):
            if not table:
                continue
            sub = next((getattr(config, n) for n in sub_configs if getattr(config, n, None) is not None), None)
            sub_type = getattr(sub, "model_type", None)
            if sub_type not in table:
                raise MMTuningError(
                    f"The modality map for '{self.model_types[0]}' ({self.source}) knows its {field_name.replace('_', ' ')} "
                    f"for {', '.join(sorted(table))}, not '{sub_type}'; register a map for this combination "
                    f"(docs/architecture.md).")
            chosen[field_name] = table[sub_type]
        return replace(self, **chosen) if chosen else self

    def prefixes(self, modality: str) -> tuple[str, ...]:
        return getattr(self, modality)

    def layer_stacks(self, modality: str) -> tuple[str, ...]:
        return {"vision": self.vision_layers, "language": self.language_layers,
                "projector": self.projector_layers}.get(modality, ())


@dataclass(frozen=True)
class Refusal:
    """A model type mmtuning deliberately does not split, with the true reason (registered like a map; a
    plugin that registers a map for the type later overrides it)."""

    model_types: tuple[str, ...]
    reason: str
    source: str = "builtin"


# `default_config_fixes` value: fill that sub-config with its class default (Gemma 4's default has no vision).
SUB_CONFIG_DEFAULT = "<sub-config class default>"


def apply_config_fixes(config: Any, fixes: dict[str, Any]) -> Any:
    """Apply a map's `default_config_fixes` to a transformers config (in place; returned for chaining)."""
    for dotted, value in fixes.items():
        if value == SUB_CONFIG_DEFAULT:
            parent, _, leaf = dotted.rpartition(".")
            value = (get_dotted(config, parent) if parent else config).sub_configs[leaf]()
        set_dotted(config, dotted, value)
    return config


def image_token_id(config: Any) -> int:
    """The image placeholder token id of a model config, from its map's `image_token` attributes."""
    known = registered_maps().get(getattr(config, "model_type", ""))
    attrs = known.image_token if isinstance(known, ModalityMap) else ModalityMap.image_token
    for attr in attrs:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no image token id (looked at {', '.join(attrs)})")


@dataclass(frozen=True)
class Leaf:
    """One adaptable module: a Linear inside a layer stack or projector, or an opt-in extra."""

    name: str
    modality: str
    layer: int | None
    kind: str  # attention | mlp | projector | other | router | patch_embed | embed_tokens | lm_head
    module_type: str
    shape: tuple[int, ...]  # weight shape
    params: int  # base parameters (weight + bias)
    local: str  # name inside its layer (`self_attn.q_proj`) or projector (`linear_1`): for explicit selection


@dataclass
class ModelLayout:
    """A modality map applied to one concrete model."""

    model_type: str
    modality_map: ModalityMap
    leaves: list[Leaf]
    layer_counts: dict[str, int]
    params: dict[str, int]
    detected: bool = False
    # Layers whose output reaches the language model (layer selections count these); default: all.
    usable_layers: dict[str, int] = field(default_factory=dict)

    def leaves_of(self, modality: str) -> list[Leaf]:
        return [leaf for leaf in self.leaves if leaf.modality == modality]


def owner_modality(name: str, prefixes: dict[str, str]) -> str | None:
    """Modality of `name`: the longest prefix wins (Qwen's merger sits inside its vision tower)."""
    best, best_len = None, -1
    for prefix, modality in prefixes.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = modality, len(prefix)
    return best


def numbered_blocks(model: nn.Module, stacks: tuple[str, ...]) -> list[str]:
    """Full names of the numbered layers in `stacks`, in the order their indices count (stacks one after
    another); a stack the model lacks adds nothing."""
    names = []
    for stack in stacks:
        try:
            names += [f"{stack}.{i}" for i in range(len(model.get_submodule(stack)))]
        except AttributeError:
            continue
    return names


# MoE routers (Llama 4's `feed_forward.router` is an nn.Linear subclass returning a tuple): listed as leaves of
# kind `router` so coverage sees them, but no kind selection (`all-linear` included) ever adapts them.
ROUTER_NAMES = frozenset({"router"})


def _kind(path_inside_layer: str) -> str:
    if path_inside_layer.rsplit(".", 1)[-1] in ROUTER_NAMES:
        return "router"
    segments = set(path_inside_layer.split("."))
    if segments & ATTENTION_SEGMENTS:
        return "attention"
    if segments & MLP_SEGMENTS:
        return "mlp"
    return "other"


def _layer_index(name: str, stacks: tuple[str, ...], offsets: list[int]) -> tuple[int, str] | None:
    for stack, offset in zip(stacks, offsets):
        match = re.match(re.escape(stack) + r"\.(\d+)\.(.+)$", name)
        if match:
            return offset + int(match.group(1)), match.group(2)
    return None


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return tuple(weight.shape) if weight is not None else ()


def _param_count(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):  # bnb 4-bit packs weights: count the logical shape
        return module.out_features * module.in_features + (module.out_features if module.bias is not None else 0)
    return sum(p.numel() for p in module.parameters(recurse=False))


def _extra_kind(name: str, module: nn.Module, modality: str, mmap: ModalityMap) -> str | None:
    explicit = {"vision": mmap.vision_extra, "language": mmap.language_extra}.get(modality, {})
    for kind, path in explicit.items():
        if name == path:
            return kind
    for kind, types in EXTRA_LEAVES.get(modality, {}).items():
        if isinstance(module, types) and kind in _GUESS_EXTRA and re.search(_GUESS_EXTRA[kind], name):
            return kind
    return None


# Name shapes of the opt-in extras when a map does not spell them out.
_GUESS_EXTRA = {
    "patch_embed": r"(patch_embed|patch_embedding|patch_embedder|patch_conv|patch_embeddings\.projection|"
                   r"(video_)?patch_projection)(\.proj|\.linear|\.input_proj)?$",
    "embed_tokens": r"(^|\.)embed_tokens$",
    "lm_head": r"(^|\.)(lm_head|output_projection)$",  # output_projection: TrOCR's (fairseq-style) head
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (names must be relative to it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_layout(model: nn.Module, modality_map: ModalityMap | None = None) -> ModelLayout:
    """List every adaptable leaf of `model` with its modality, layer index and kind."""
    model = unwrap(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    detected = False
    if modality_map is None:
        modality_map = lookup_map(model_type)
        if modality_map is None:
            modality_map, detected = detect_map(model), True
    modality_map = modality_map.for_config(model.config)
    _check_map_matches(model, modality_map, model_type)
    prefixes = {p: m for m in MODALITIES for p in modality_map.prefixes(m)}
    prefixes.update(dict.fromkeys(modality_map.excluded, EXCLUDED))
    offsets = {m: _stack_offsets(model, modality_map.layer_stacks(m)) for m in MODALITIES}
    leaves: list[Leaf] = []
    params = dict.fromkeys(MODALITIES, 0)
    for name, module in model.named_modules():
        modality = owner_modality(name, prefixes) if name != "lm_head" else "language"
        if modality is None or modality == EXCLUDED:
            continue
        params[modality] += sum(p.numel() for p in module.parameters(recurse=False))
        leaf = _leaf(name, module, modality, modality_map, offsets)
        if leaf is not None:
            leaves.append(leaf)
    counts = {m: sum(_stack_len(model, s) for s in modality_map.layer_stacks(m)) for m in MODALITIES}
    usable = dict(counts, vision=_usable_vision_layers(model.config, modality_map, counts["vision"]))
    return ModelLayout(model_type, modality_map, leaves, counts, params, detected, usable)


def _usable_vision_layers(config: Any, mmap: ModalityMap, count: int) -> int:
    """How many vision layers feed the projector. hidden_states holds the embeddings then each layer's
    output, so feature layer -2 (LLaVA) is the output of layer N-2 and layer N-1 is never used."""
    value = getattr(config, mmap.vision_feature_layer, None) if mmap.vision_feature_layer else None
    if value is None or count == 0:
        return count
    indices = value if isinstance(value, (list, tuple)) else [value]
    deepest = max(int(i) if int(i) >= 0 else count + 1 + int(i) for i in indices)
    return max(1, min(count, deepest))


# owner_modality's answer for a module under a map's `excluded` prefixes
EXCLUDED = "excluded"


def _leaf(name, module, modality, mmap, offsets) -> Leaf | None:
    shape, count, type_name = _weight_shape(module), _param_count(module), type(module).__name__
    if modality == "projector":
        located = _layer_index(name, mmap.projector_layers, offsets["projector"])
        if located is not None and isinstance(module, LAYER_LEAF_TYPES):
            layer, inside = located
            return Leaf(name, modality, layer, _kind(inside), type_name, shape, count, inside)
        if isinstance(module, LAYER_LEAF_TYPES):
            local = next((name[len(p) + 1:] for p in mmap.projector if name.startswith(p + ".")),
                         name.rsplit(".", 1)[-1])
            return Leaf(name, modality, None, "projector", type_name, shape, count, local)
        return None
    stacks = mmap.layer_stacks(modality)
    located = _layer_index(name, stacks, offsets[modality])
    if located is not None and isinstance(module, LAYER_LEAF_TYPES):
        layer, inside = located
        return Leaf(name, modality, layer, _kind(inside), type_name, shape, count, inside)
    extra = _extra_kind(name, module, modality, mmap)
    if extra is not None:
        return Leaf(name, modality, None, extra, type_name, shape, count, extra)
    return None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _stack_len(model: nn.Module, path: str) -> int:
    stack = _get(model, path)
    return len(stack) if stack is not None else 0


def _stack_offsets(model: nn.Module, stacks: tuple[str, ...]) -> list[int]:
    offsets, total = [], 0
    for stack in stacks:
        offsets.append(total)
        total += _stack_len(model, stack)
    return offsets


def _check_map_matches(model: nn.Module, mmap: ModalityMap, model_type: str) -> None:
    """A map whose prefixes are missing from the model is stale (a transformers rename): say so."""
    missing = [p for m in MODALITIES for p in mmap.prefixes(m) if _get(model, p) is None]
    missing += [s for m in MODALITIES for s in mmap.layer_stacks(m) if _get(model, s) is None]
    if missing:
        tops = ", ".join(n for n, _ in unwrap(model).named_children())
        raise MMTuningError(
            f"The modality map for '{model_type}' ({mmap.source}) names modules this model does not have: "
            f"{', '.join(missing)}. The model's top-level modules are: {tops}. This usually means transformers "
            f"renamed them; register an updated ModalityMap (see docs/architecture.md) or upgrade mmtuning."
        )


# --- registry -------------------------------------------------------------------------------------


def registered() -> dict[str, ModalityMap | Refusal]:
    """model_type -> ModalityMap or Refusal from every plugin (built-ins included); a later plugin overrides."""
    from ..plugins import registered as registered_of_kind

    return registered_of_kind("architectures")


def registered_maps() -> dict[str, ModalityMap]:
    """model_type -> ModalityMap from every plugin (built-ins included); a later plugin overrides."""
    return {t: e for t, e in registered().items() if isinstance(e, ModalityMap)}


def lookup_map(model_type: str) -> ModalityMap | None:
    """The registered map of `model_type`; None when nobody registered one; an error naming the reason when
    the type is refused on purpose."""
    entry = registered().get(model_type)
    if isinstance(entry, Refusal):
        raise MMTuningError(f"mmtuning does not split model type '{model_type}' into modalities: {entry.reason}. "
                            f"A plugin can register a ModalityMap for it (docs/architecture.md).")
    return entry


# --- detection fallback ---------------------------------------------------------------------------

DETECT_NAMES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"),
    "projector": ("multi_modal_projector", "mm_projector", "connector", "merger", "projector", "aligner"),
    "language": ("language_model", "text_model", "llm", "decoder"),
}


# Why a module is in a map's `excluded` (shared by the built-in maps and detection).
AUDIO_TOWER = "audio tower: neither vision nor language, and mmtuning has no audio modality yet (never adapted)"
UNUSED_POOLING_HEAD = "attention-pooling head of the vision tower: its output never reaches the language model"
AUDIO_NAMES = ("audio_tower", "audio_model", "audio_encoder")


def _named_candidates(root: nn.Module, base: str) -> Iterable[tuple[str, nn.Module]]:
    for name, child in root.named_children():
        yield (f"{base}.{name}" if base else name), child


def detect_map(model: nn.Module) -> ModalityMap:
    """Guess a map for a model type nobody registered; raise with instructions when unsure."""
    model = unwrap(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    has_parts = hasattr(model.config, "vision_config") and hasattr(model.config, "text_config")
    inner = "model" if isinstance(getattr(model, "model", None), nn.Module) else ""
    root = model.get_submodule(inner) if inner else model
    found: dict[str, list[str]] = {m: [] for m in MODALITIES}
    for path, child in _named_candidates(root, inner):
        for modality, names in DETECT_NAMES.items():
            if path.rsplit(".", 1)[-1] in names:
                found[modality].append(path)
                if modality == "vision":  # a projector nested in the vision tower (Qwen-VL's merger)
                    found["projector"] += [p for p, _ in _named_candidates(child, path)
                                           if p.rsplit(".", 1)[-1] in DETECT_NAMES["projector"]]
    unsure = [m for m in MODALITIES if len(found[m]) != 1]
    if not has_parts or unsure:
        raise MMTuningError(
            f"mmtuning has no modality map for model type '{model_type}' and could not detect one "
            f"(found vision={found['vision']}, projector={found['projector']}, language={found['language']}; "
            f"top-level modules: {', '.join(n for n, _ in root.named_children())}). Register a ModalityMap "
            f"for it from a plugin (entry point group 'mmtuning', hook register_architectures; see "
            f"docs/architecture.md), or pass one to plan_targets(..., modality_map=...)."
        )
    stacks = {m: (_largest_stack(model, found[m][0]),) for m in ("vision", "language")}
    excluded = {path: AUDIO_TOWER for path, _ in _named_candidates(root, inner) if path.rsplit(".", 1)[-1] in AUDIO_NAMES}
    head = _get(model, found["vision"][0] + ".head")
    if head is not None and type(head).__name__.endswith("PoolingHead"):
        excluded[found["vision"][0] + ".head"] = UNUSED_POOLING_HEAD
    return ModalityMap(
        model_types=(model_type,),
        vision=tuple(found["vision"]),
        projector=tuple(found["projector"]),
        language=tuple(found["language"]),
        vision_layers=stacks["vision"],
        language_layers=stacks["language"],
        excluded=excluded,
        source="detected",
    )


# Detection trusts a layer stack only if it holds this share of its modality's Linear modules; less means
# the encoder is split in stages (DaViT, Swin) or has a big head, and guessing would misplace layers.
STACK_COVERAGE = 0.8


def _largest_stack(model: nn.Module, prefix: str) -> str:
    root = model.get_submodule(prefix)
    stacks = [(len(mod), name) for name, mod in root.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    linears = sum(isinstance(m, nn.Linear) for m in root.modules())
    if stacks:
        _, name = max(stacks)
        inside = sum(isinstance(m, nn.Linear) for m in root.get_submodule(name).modules())
        if linears and inside / linears >= STACK_COVERAGE:
            return f"{prefix}.{name}" if name else prefix
    raise MMTuningError(
        f"Detected '{prefix}' as a modality but found no single layer list holding most of its Linear modules; "
        f"register a ModalityMap for this model type that names its layer stacks (docs/architecture.md)."
    )
