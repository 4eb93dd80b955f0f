"""`MMTuningConfig`: the one schema of the `mmtuning:` block, for every host and the CLI.

docs/config.md is generated from these models (`python -m mmtuning_plugin.docgen`), so field
descriptions here are the user documentation.

The schema is the bottom floor: every spec model lives here (layer selections, the quantization policy, the
schedule specs and their `LayerSchedule` base, loss options), and this module imports no feature module.
Plugin-registered schedules, losses and methods are looked up through `plugins.registered`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MMTuningError, did_you_mean, unknown_key
from .plugins import registered

MODALITIES: tuple[str, ...] = ("vision", "projector", "language")


def validation_lines(error: ValidationError, where: str, unknown: str = "key",
                     valid: Callable[[tuple], list[str]] | None = None) -> list[str]:
    """pydantic errors as `<where>.<yaml key>: <what to fix>` lines: the one formatter of every settings block
    (mmtuning, quant, schedules, loss options). `valid(loc)` lists the keys allowed where an unknown one was."""
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in (where, *item["loc"]) if not _is_union_branch(p))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown {unknown}"
            if valid is not None:
                message = unknown_key(str(item["loc"][-1]), valid(item["loc"]), noun=unknown)
        lines.append(_one_key_path(path, message))
    return list(dict.fromkeys(lines))


_KEY_PATH = re.compile(r"^([A-Za-z_][\w/]*(?:\.[A-Za-z_][\w/]*)*): ")


def _one_key_path(path: str, message: str) -> str:
    """A validator's message that starts with its own key (`vision.layers: ...`, `schedule.type: ...`) is joined
    onto the location, so every error names its key one way: `mmtuning.vision.layers: ...`."""
    match = _KEY_PATH.match(message)
    if not match:
        return f"{path}: {message}"
    inner = match.group(1).split(".")
    outer = path.split(".")
    overlap = next((n for n in range(min(len(inner), len(outer)), 0, -1) if outer[-n:] == inner[:n]), 0)
    return f"{'.'.join(outer + inner[overlap:])}: {message[match.end():]}"


def _is_union_branch(part: Any) -> bool:
    """pydantic tags errors inside a Union with the branch type (`literal[...]`): not a YAML key."""
    return isinstance(part, str) and "[" in part


def layer_span(layers: Iterable[int]) -> str:
    """Layer indices as text: `0-3` for a run, `0,2,5` otherwise, `none` when empty (the one layer-range
    printer of reports, schedules and errors)."""
    layers = list(layers)
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


# --- quantization policy (`quant:`) ---------------------------------------------------------------------

Precision = Literal["nf4", "fp4", "int8", "none"]
FOUR_BIT = ("nf4", "fp4")

# Presets: the values a `quant: <name>` line stands for. Any field can still be overridden next to `preset:`.
PRESETS: dict[str, dict[str, Any]] = {
    "all-4bit": dict(vision="nf4", projector="nf4", language="nf4", keep_patch_embed=False,
                     keep_vision_edge_blocks=False, keep_cross_attention=False),
    "balanced": dict(vision="nf4", projector="none", language="nf4", keep_patch_embed=True,
                     keep_vision_edge_blocks=True, keep_cross_attention=True),
    "language-4bit": dict(vision="none", projector="none", language="nf4", keep_patch_embed=True,
                          keep_vision_edge_blocks=True, keep_cross_attention=True),
    "none": dict(vision="none", projector="none", language="none", keep_patch_embed=True,
                 keep_vision_edge_blocks=True, keep_cross_attention=True),
}
DEFAULT_PRESET = "balanced"

class QuantPolicy(BaseModel):
    """Quantization per modality (`quant:`). Write a preset (`quant: balanced`) or a block:
    `{preset: balanced, keep_16bit: [attn.proj], checkpoint_vision: true}`; without `preset:` a block starts
    from `balanced`. `nf4`/`fp4` load 4-bit, `int8` 8-bit, `none` leaves the modality in 16-bit."""

    model_config = ConfigDict(extra="forbid")

    preset: Optional[Literal["all-4bit", "balanced", "language-4bit", "none"]] = Field(
        default=None, description="The preset the other fields start from (`balanced` when omitted).")
    vision: Precision = Field(default="nf4", description="Vision encoder precision.")
    projector: Precision = Field(default="none", description="Projector precision (`none`: kept 16-bit).")
    language: Precision = Field(default="nf4", description="Language model precision (`lm_head` is always 16-bit).")
    keep_patch_embed: bool = Field(default=True, description="Keep the vision patch embedding 16-bit (if it is a Linear).")
    keep_vision_edge_blocks: bool = Field(default=True, description="Keep the first and the last vision block 16-bit.")
    keep_cross_attention: bool = Field(
        default=True, description="Keep language layers with cross-attention to the image (Llama 3.2 Vision) 16-bit.")
    keep_16bit: list[str] = Field(
        default_factory=list,
        description="Extra modules kept 16-bit: regexes matched against whole dotted segments of full names "
        "(`attn.proj`, `blocks.7`, `model.visual.blocks.3.mlp.fc1`). Each must match a Linear module.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="bnb_4bit_compute_dtype: the dtype 4-bit matmuls run in.")
    double_quant: bool = Field(default=True, description="bnb_4bit_use_double_quant: quantize the quantization constants too.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="bnb_4bit_quant_storage. `auto` = compute_dtype, which FSDP and DeepSpeed ZeRO-3 need to shard "
        "4-bit weights together with the 16-bit ones (same bytes as uint8).")
    upcast_16bit: bool = Field(
        default=False, description="k-bit preparation casts frozen 16-bit weights to fp32 (PEFT's behaviour; doubles their memory). "
        "The k-bit settings apply in the transformers Trainer integration; Axolotl and LLaMA-Factory prepare the "
        "model themselves and refuse them.")
    fp32_norms: bool = Field(default=True, description="k-bit preparation runs normalization layers in fp32.")
    checkpoint_vision: bool = Field(default=False, description="Gradient checkpointing in the vision encoder blocks.")
    checkpoint_language: bool = Field(default=False, description="Gradient checkpointing in the language model layers.")
    checkpoint_reentrant: bool = Field(
        default=False, description="Use reentrant checkpointing (then input gradients are enabled for it).")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, dict):
            return value
        preset = value.get("preset") or DEFAULT_PRESET
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; write one of {', '.join(PRESETS)}")
        return {**PRESETS[preset], **value}

    @model_validator(mode="after")
    def _one_bnb_config(self) -> "QuantPolicy":
        kinds = {p for p in self.precisions().values() if p != "none"}
        if len(kinds) > 1:
            raise ValueError(
                f"one BitsAndBytesConfig loads every quantized module with one type, but this policy asks for "
                f"{', '.join(f'{m}: {p}' for m, p in self.precisions().items())}; use the same type for every quantized "
                f"modality, or `none` to keep one in 16-bit")
        return self

    def precisions(self) -> dict[str, str]:
        return {m: getattr(self, m) for m in MODALITIES}

    @property
    def quant_type(self) -> str | None:
        return next((p for p in self.precisions().values() if p != "none"), None)

    @property
    def storage_dtype(self) -> str:
        return self.compute_dtype if self.quant_storage == "auto" else self.quant_storage



KINDS = ("attention", "mlp", "all-linear")
EXTRAS_BY_MODALITY = {"vision": ("patch_embed",), "projector": (), "language": ("embed_tokens", "lm_head")}
_RANGE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parameter_count(value: Any) -> int:
    """`2M`, `1.5m`, `500k`, `2e6` or a plain integer as a number of parameters."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of parameters; write e.g. 2M or 500k")
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", str(value).lower().replace("_", ""))
    if match is None:
        raise ValueError(f"cannot read {value!r} as a number of parameters; write e.g. 2M, 500k or 2000000")
    return int(round(float(match.group(1)) * _UNITS[match.group(2)]))


class AutoLayers(BaseModel):
    """`layers: {auto: {...}}`: the layers are chosen by a short gradient probe on the first training batches
    (mmtuning_plugin/probe.py, docs/layers-auto.md), which scores each layer's task importance against its general
    importance. Give `top_k` or `budget` (at most one); `layers: auto` alone picks the top half."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: Optional[int] = Field(default=None, description="Choose this many layers, the best-scoring first.")
    budget: Optional[int] = Field(
        default=None, description="Trainable-parameter budget of this modality's adapters (`2M`, `500k`): the best-"
        "scoring layers whose adapters fit in it (`include:` modules come on top).")
    batches: int = Field(
        default=4, ge=1, description="Training batches the probe runs on (one forward each). One probe serves every "
        "`auto` modality, on the largest `batches` among them.")

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a whole number of layers; write e.g. {{auto: {{top_k: 4}}}}")
        if value < 1:
            raise ValueError(f"{value} selects no layer; write top_k: 1 or more, or turn the modality off (`false`)")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        if value is None:
            return value
        count = parameter_count(value)
        if count < 1:
            raise ValueError(f"{value!r} allows no trainable parameter; write a budget such as 2M, or turn "
                             f"the modality off (`false`)")
        return count

    @model_validator(mode="after")
    def _one_limit(self) -> "AutoLayers":
        if self.top_k is not None and self.budget is not None:
            raise ValueError("give either top_k (a number of layers) or budget (trainable parameters), not both")
        return self

    def describe(self) -> str:
        if self.budget is not None:
            return f"auto, budget {self.budget:,}"
        return f"auto, top {self.top_k}" if self.top_k is not None else "auto, top half"


class LayerSelection(BaseModel):
    """Which numbered layers of a modality get adapters.

    Written as `all`, `{top: N}` / `top:N`, `{bottom: N}` / `bottom:N`, `{fraction: 0.5}` (the top half),
    a list of indices and inclusive ranges such as `[0, 1, "4-7", -1]` / `"0-3,7"`, or `auto` /
    `{auto: {top_k: N}}` / `{auto: {budget: 2M}}` (chosen by a gradient probe, see `AutoLayers`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["all", "top", "bottom", "fraction", "indices", "auto"] = "all"
    count: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, le=1)
    indices: tuple[int, ...] | None = None
    auto: AutoLayers | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, LayerSelection) or (isinstance(value, dict) and "mode" in value):
            return value
        if value is None or value == "all" or value == {}:
            return {"mode": "all"}
        if value == "auto" or (isinstance(value, dict) and "auto" in value):
            return _parse_auto(value)
        if isinstance(value, bool):
            raise ValueError("write `all`, `{top: N}`, `{bottom: N}`, `{fraction: F}` or a list of indices, not true/false")
        if isinstance(value, int):
            return {"mode": "indices", "indices": (value,)}
        if isinstance(value, str):
            return _parse_layer_string(value)
        if isinstance(value, dict):
            return _parse_layer_dict(value)
        if isinstance(value, (list, tuple)):
            return {"mode": "indices", "indices": tuple(i for item in value for i in _indices_of(item))}
        raise ValueError(f"cannot read layers={value!r}")

    def resolve(self, num_layers: int, where: str, total: int | None = None) -> list[int]:
        """The selected indices among a modality's `num_layers` usable layers (`total` counts unused ones too:
        layers after the one a model reads its vision features from, which never get a gradient)."""
        total = num_layers if total is None else total
        if self.mode == "auto":
            raise MMTuningError(f"{where}: `layers: auto` chooses layers with a gradient probe on training batches, "
                                f"and none were given here. Give the probe data: pass the unwrapped model to "
                                f"MMTuningTrainer with its train_dataset (it probes the first batches), call "
                                f"MMTuning.wrap(model, probe_batches=...), or run `mmtune inspect-targets MODEL "
                                f"--probe DATA.jsonl`; or write the layers yourself (e.g. {{top: 4}}).")
        if total > num_layers and self.mode == "indices":
            late = [i for i in self.indices if num_layers <= i < total]
            if late:
                raise MMTuningError(
                    f"{where}: layers {late} come after the vision layer this model reads its features from "
                    f"(vision_feature_layer), so their output never reaches the language model and adapters there "
                    f"would never train; choose among layers 0-{num_layers - 1}."
                )
        if num_layers == 0:
            raise MMTuningError(f"{where}: this modality has no numbered layers, so `layers` cannot select any; "
                                f"remove the `layers` key.")
        if self.mode == "all":
            return list(range(num_layers))
        if self.mode in ("top", "bottom"):
            if self.count > num_layers:
                unused = f" usable; the last {total - num_layers} never reach the language model" if total > num_layers else ""
                raise MMTuningError(f"{where}: asks for {self.mode} {self.count} layers but there are only "
                                    f"{num_layers} (0-{num_layers - 1}{unused}); write `{{{self.mode}: {num_layers}}}` or `all`.")
            return list(range(num_layers - self.count, num_layers)) if self.mode == "top" else list(range(self.count))
        if self.mode == "fraction":
            count = max(1, math.ceil(self.fraction * num_layers))
            return list(range(num_layers - count, num_layers))
        bad = [i for i in self.indices if not -num_layers <= i < num_layers]
        if bad:
            raise MMTuningError(f"{where}: layer indices {bad} do not exist; this modality has {num_layers} "
                                f"layers, numbered 0-{num_layers - 1} (or -1 for the last).")
        return sorted({i % num_layers for i in self.indices})

    def describe(self) -> str:
        if self.mode == "auto":
            return self.auto.describe()
        if self.mode == "all":
            return "all"
        if self.mode in ("top", "bottom"):
            return f"{self.mode} {self.count}"
        if self.mode == "fraction":
            return f"top {self.fraction:g}"
        return ",".join(map(str, self.indices))


def _indices_of(item: Any) -> list[int]:
    if isinstance(item, bool):
        raise ValueError(f"layer index {item!r} is not a number")
    if isinstance(item, int):
        return [item]
    if isinstance(item, str):
        match = _RANGE.match(item.strip())
        if match:
            start, end = int(match.group(1)), int(match.group(2))
            if end < start:
                raise ValueError(f"range '{item}' runs backwards; write '{end}-{start}'")
            return list(range(start, end + 1))
        if re.fullmatch(r"-?\d+", item.strip()):
            return [int(item)]
    raise ValueError(f"cannot read layer index {item!r}; write a number or an inclusive range like '4-7'")


def _parse_auto(value: Any) -> dict:
    """`auto` or `{auto: {top_k: N}}` / `{auto: {budget: 2M}}` (`{auto: N}` is short for top_k N)."""
    if value == "auto":
        return {"mode": "auto", "auto": {}}
    if set(value) != {"auto"}:
        raise ValueError(f"layers {value!r}: `auto` stands alone; write {{auto: {{top_k: N}}}} or {{auto: {{budget: 2M}}}}")
    options = value["auto"]
    if options is None or options is True:
        options = {}
    elif isinstance(options, int) and not isinstance(options, bool):
        options = {"top_k": options}
    elif not isinstance(options, (dict, AutoLayers)):
        raise ValueError(f"layers {{auto: {options!r}}}: write {{auto: {{top_k: N}}}} or {{auto: {{budget: 2M}}}}")
    return {"mode": "auto", "auto": options}


def _parse_layer_string(text: str) -> dict:
    text = text.strip()
    match = re.fullmatch(r"(top|bottom|fraction)\s*[:=]\s*([0-9.]+)", text)
    if match:
        return _parse_layer_dict({match.group(1): float(match.group(2)) if match.group(1) == "fraction" else int(match.group(2))})
    return {"mode": "indices", "indices": tuple(i for part in text.split(",") for i in _indices_of(part))}


def _parse_layer_dict(value: dict) -> dict:
    keys = set(value)
    if len(keys) != 1 or not keys <= {"top", "bottom", "fraction"}:
        raise ValueError(f"layers {value!r}: write exactly one of {{top: N}}, {{bottom: N}}, {{fraction: F}}")
    (key, number), = value.items()
    if key == "fraction":
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= 1:
            raise ValueError(f"layers {{fraction: {number!r}}}: the share of layers is a number in (0, 1], e.g. "
                             f"{{fraction: 0.5}} for the top half; to put no adapters on this modality turn it off "
                             f"(`false`)")
        return {"mode": "fraction", "fraction": number}
    if not isinstance(number, int) or isinstance(number, bool):
        raise ValueError(f"layers {{{key}: {number!r}}}: {key} takes a whole number of layers, e.g. {{{key}: 4}}")
    if number < 1:
        raise ValueError(f"layers {{{key}: {number}}} selects no layer; write {{{key}: 1}} or more, `all`, or turn "
                         f"the modality off (`false`) to put no adapters on it")
    return {"mode": key, "count": number}


# --- layer schedules (`schedule:`) ------------------------------------------------------------------------

At = Union[int, float]  # an int is an optimizer step; a float in [0, 1] is a fraction of training


def _check_at(value: At, where: str = "") -> At:
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool):
        raise ValueError(f"{prefix}write a step number or a fraction of training, not {value!r}")
    if isinstance(value, float) and not 0 <= value <= 1:
        raise ValueError(f"{prefix}{value!r} is neither a step number (write an integer) nor a fraction in [0, 1]")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{prefix}step {value} is negative")
    return value


@dataclass(frozen=True)
class Stage:
    """From optimizer step `at` on (step or fraction), exactly these layers train; `extras`: the
    modality's parameters outside numbered layers (projector, patch_embed, embed_tokens, lm_head)."""

    at: At
    layers: tuple[int, ...]
    extras: bool


class LayerSchedule(BaseModel):
    """Base class of a registered schedule (`register(name, schedule_class)`): its fields are the YAML options
    next to `type:`, and `stages` turns them into the stages of one modality. Like a loss's options, a schedule
    is validated by pydantic, so an unknown or wrong option names its key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    # Modalities this schedule applies to, and whether it needs numbered layers with adapters there.
    modalities: ClassVar[tuple[str, ...]] = ("vision", "language")
    needs_layers: ClassVar[bool] = True

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:  # pragma: no cover
        """From the targeted layer indices (sorted) and the modality's layer count: the stages, first at 0."""
        raise NotImplementedError


class StaticSchedule(LayerSchedule):
    """Every targeted layer trains from step 0 (the default)."""

    type: Literal["static"] = "static"
    needs_layers: ClassVar[bool] = False

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        return [Stage(0, tuple(targeted), True)]


class TopDownSchedule(LayerSchedule):
    """Start with the top `start` targeted layers; add `step_layers` more (downward) every `every`
    steps (int) or fraction of training (float), until every targeted layer trains. Without `every`,
    the stages are spread evenly so that all layers train from half-way through training."""

    type: Literal["top_down"] = "top_down"
    start: int = Field(default=1, ge=1, description="Targeted layers (counted from the top) that train from step 0.")
    step_layers: int = Field(default=1, ge=1, description="Layers added at each stage change.")
    every: Optional[At] = Field(default=None, description="Steps (int >= 1) or fraction of training (float) between stages.")

    @field_validator("every")
    @classmethod
    def _every(cls, value):
        if value is None:
            return value
        _check_at(value)
        if value == 0:
            raise ValueError("every: 0 would add every layer at once; write a step count >= 1 or a fraction > 0")
        return value

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        count = len(targeted)
        if self.start >= count:
            raise MMTuningError(f"{where}: top_down start: {self.start} already covers all {count} targeted layers "
                                f"({layer_span(targeted)}), so nothing would be added later; write start: {max(1, count - 1)} "
                                f"or less, or use schedule: static.")
        changes = math.ceil((count - self.start) / self.step_layers)
        every: At = self.every if self.every is not None else 0.5 / changes
        stages = []
        for index in range(changes + 1):
            on = min(count, self.start + index * self.step_layers)
            at: At = index * every if index else 0
            if isinstance(at, float) and at > 1:
                raise MMTuningError(f"{where}: top_down every: {every:g} puts stage {index} at {at * 100:g}% of "
                                    f"training, past the end; lower `every` or raise `step_layers`.")
            stages.append(Stage(at, tuple(targeted[count - on:]), True))
        return stages


class CustomStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    at: At = Field(description="Optimizer step (int) or fraction of training (float) where this stage starts.")
    layers: LayerSelection = Field(description="Layers that train from `at` on (same forms as `layers:`).")

    @field_validator("at")
    @classmethod
    def _at(cls, value):
        return _check_at(value)


class CustomSchedule(LayerSchedule):
    """An explicit list of stages `{at: step-or-fraction, layers: ...}`; before the first stage, no layer trains."""

    type: Literal["custom"] = "custom"
    stages_: tuple[CustomStage, ...] = Field(alias="stages", min_length=1)

    @model_validator(mode="after")
    def _ordered(self):
        for kind in (int, float):
            ats = [s.at for s in self.stages_ if isinstance(s.at, kind) and not isinstance(s.at, bool)]
            if ats != sorted(ats) or len(set(ats)) != len(ats):
                raise ValueError(f"stages: `at` values {ats} must strictly increase")
        return self

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        out = [] if self.stages_[0].at == 0 else [Stage(0, (), False)]
        for index, stage in enumerate(self.stages_):
            layers = stage.layers.resolve(num_layers, f"{where}.stages[{index}].layers")
            outside = sorted(set(layers) - set(targeted))
            if outside:
                raise MMTuningError(f"{where}.stages[{index}].layers: layers {outside} get no adapters (targeted: "
                                    f"{layer_span(targeted)}); a schedule can only turn targeted layers on. Widen `layers:` "
                                    f"or drop them from the stage.")
            out.append(Stage(stage.at, tuple(layers), bool(layers)))
        return out


class ProjectorSchedule(LayerSchedule):
    """The projector trains `always`, `{from: N}` (from step or fraction N on), `{until: N}`, or both."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    type: Literal["projector"] = "projector"
    modalities: ClassVar[tuple[str, ...]] = ("projector",)
    needs_layers: ClassVar[bool] = False
    start: Optional[At] = Field(default=None, alias="from")
    until: Optional[At] = None

    @model_validator(mode="before")
    @classmethod
    def _always(cls, value):
        return {"type": "projector"} if value in ("always", "static", None) else value

    @model_validator(mode="after")
    def _check(self):
        for name, value in (("from", self.start), ("until", self.until)):
            if value is not None:
                _check_at(value, name)
        if self.start is not None and self.until is not None and type(self.start) is type(self.until) \
                and self.until <= self.start:
            raise ValueError(f"until: {self.until} is not after from: {self.start}")
        return self

    def stages(self, targeted: list[int], num_layers: int, where: str) -> list[Stage]:
        out = [Stage(0, (), self.start in (None, 0))]
        if self.start not in (None, 0):
            out.append(Stage(self.start, (), True))
        if self.until is not None:
            out.append(Stage(self.until, (), False))
        return out


def registered_schedules() -> dict[str, type[LayerSchedule]]:
    """Schedule type name -> LayerSchedule subclass (built-ins and plugins, via `register_schedules`)."""
    return registered("schedules")


def parse_schedule(value: Any, modality: str, where: str | None = None) -> LayerSchedule:
    """The `schedule:` value of one modality as a schedule object (with a `stages(...)` method)."""
    where = where or f"mmtuning.{modality}.schedule"
    if isinstance(value, LayerSchedule):
        return value
    projector = modality == "projector"
    if value is None or value == "static" or (projector and value == "always"):
        value = "projector" if projector else "static"
    if isinstance(value, str):
        value = {"type": value}
    if projector and isinstance(value, dict) and "type" not in value:
        value = {"type": "projector", **value}
    hint = (" (the projector takes `always`, `{from: N}`, `{until: N}`; N a step or a fraction of training)"
            if projector else "")
    if not isinstance(value, dict):
        if projector:
            raise MMTuningError(f"{where}: cannot read {value!r}{hint}")
        raise MMTuningError(f"{where}: write `static`, `top_down`, or a mapping with `type:` (e.g. "
                            f"{{type: top_down, start: 2, every: 100}}), not {value!r}.")
    kind = value.get("type", "static")
    classes = registered_schedules()
    fitting = sorted(n for n, c in classes.items() if modality in c.modalities)
    if kind not in fitting:
        raise MMTuningError(f"{where}.type: unknown schedule {kind!r}; known: {', '.join(fitting)}.{hint}")
    try:
        return classes[kind].model_validate(dict(value))
    except ValidationError as error:
        raise MMTuningError("; ".join(validation_lines(error, where)) + hint) from None


# --- adapter methods (`method:`) ---------------------------------------------------------------------------

INITS = ("lora", "pissa", "milora", "olora", "corda")  # `init:` values; methods/inits.py holds how each starts
INITS_FROM_DATA = ("corda",)  # inits that read the first training batches before wrapping


class MethodOptions(BaseModel):
    """Options of an adapter method; a registered method subclasses this to add its own (none for `lora`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def registered_methods() -> dict[str, Any]:
    """Method name -> AdapterMethod subclass (built-ins and plugins, via `register_methods`)."""
    return registered("methods")


def split_method(data: dict) -> dict:
    """`method: {name: moe-lora, experts: 4}` -> `method: moe-lora` + `method_options: {experts: 4}`."""
    value = data.get("method")
    if not isinstance(value, dict):
        return data
    value = dict(value)
    if "name" not in value:
        raise ValueError(f"method: a block needs its `name` (e.g. {{name: moe-lora, experts: 4}}); got {value!r}")
    if data.get("method_options"):
        raise ValueError("method: write the options in the `method:` block or in `method_options:`, not both")
    return {**data, "method": value.pop("name"), "method_options": value}


def validate_method_options(method: str, options: Any) -> MethodOptions:
    """The method's options as its own Options model; an unknown method lists the registered ones."""
    known = registered_methods()
    if method not in known:
        raise ValueError(f"unknown method '{method}'{did_you_mean(method, known)}; registered methods: "
                         f"{', '.join(sorted(known))} (a plugin registers more through `register_methods`)")
    if isinstance(options, known[method].Options):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    if not isinstance(options, dict):
        raise ValueError(f"method_options: write a mapping of options of method {method}, got {options!r}")
    try:
        return known[method].Options.model_validate(options)
    except ValidationError as error:
        fields = list(known[method].Options.model_fields)
        lines = validation_lines(error, method, "option", lambda loc: fields or ["(none: it has no options)"])
        raise ValueError("; ".join(lines)) from None


# --- loss options (`losses:`) -----------------------------------------------------------------------------


class LossOptions(BaseModel):
    """Options every loss has; a loss subclasses this to add its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=0.1, ge=0, description="Multiplier of this term in the total loss.")
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0 over these optimizer steps.")

    @model_validator(mode="after")
    def _weight_does_something(self):
        if self.weight == 0 and not self.acts_without_weight():
            raise ValueError("weight: 0 turns this loss into a no-op; remove the loss or give it a positive weight")
        return self

    def acts_without_weight(self) -> bool:
        """True when the loss changes training even at weight 0 (sculpt's sparsification)."""
        return False

    def factor(self, step: int) -> float:
        """The weight at optimizer step `step` (linear warm-up, then constant)."""
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)


def validate_losses(value: Any) -> dict[str, LossOptions]:
    """The `losses:` mapping as validated option objects; unknown names list the registered ones.

    Raises ValueError (pydantic turns it into `mmtuning.losses: ...`)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"write a mapping of loss name -> options, e.g. {{anchor: {{weight: 0.1}}}}; got {value!r}")
    known = registered("losses")
    result: dict[str, LossOptions] = {}
    for name, options in value.items():
        if name not in known:
            raise ValueError(f"unknown loss '{name}'; registered losses: {', '.join(sorted(known))}")
        loss_class = known[name]
        if isinstance(options, LossOptions):
            result[name] = options
            continue
        if options is None or options is True:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"{name}: write its options as a mapping (e.g. {{weight: 0.1}}), got {options!r}")
        try:
            result[name] = loss_class.Options.model_validate(options)
        except ValidationError as error:
            fields = list(loss_class.Options.model_fields)
            raise ValueError("; ".join(validation_lines(error, name, "option", lambda loc: fields))) from None
    return result


# --- selective tuning (`selective:`) -------------------------------------------------------------------

SELECTIVE_METHODS: dict[str, str] = {
    "layernorm": "the weights and biases of the normalization layers in the selected layers (LayerNorm tuning)",
    "bias": "the biases of the selected Linear modules and of the norms in the selected layers (BitFit)",
    "full": "every weight of the selected layers: their Linear modules and norms (e.g. `layers: {top: 2}`: the top "
            "two layers whole); with `modules:`, only those Linear modules",
    "spider": "like `full`, but each step updates only the weights whose accumulated gradient importance exceeds "
              "their pre-trained magnitude (SPIDER, ICML 2025), at most `mask_ratio` of them",
}
# Modality keys that shape adapters only: given next to `selective:` they would do nothing.
ADAPTER_ONLY_KEYS = ("r", "alpha", "include", "full")


class SelectiveSpec(BaseModel):
    """Selective tuning of one modality (`selective:`): the modality's own weights train, with no adapter on it.
    `layers:` and `modules:` choose where. The trained modules are PEFT `modules_to_save`, so the saved adapter
    holds them and loads like any other. Write a method name (`selective: layernorm`) or a block
    (`selective: {method: spider, mask_ratio: 0.1}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["layernorm", "bias", "full", "spider"] = Field(
        description="What trains: " + "; ".join(f"`{k}`: {v}" for k, v in SELECTIVE_METHODS.items()) + ".")
    mask_ratio: Optional[float] = Field(
        default=None,
        description="`spider` only: the largest share of the selected weights one step may update, in (0, 1] "
        "(default 1: every weight whose task importance exceeds its pre-trained magnitude).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"method": value}
        return value

    @model_validator(mode="after")
    def _ratio(self) -> "SelectiveSpec":
        ratio = self.mask_ratio
        if ratio is not None and self.method != "spider":
            raise ValueError(f"mask_ratio belongs to method spider (importance-masked updates); remove it, or write "
                             f"`{{method: spider, mask_ratio: {ratio:g}}}`")
        if ratio is not None and (isinstance(ratio, bool) or not 0 < ratio <= 1):
            raise ValueError(f"mask_ratio {ratio:g} is outside (0, 1]; it is the share of the selected weights a step "
                             f"may update: write e.g. 0.1 (a tenth), or 1 (no cap)")
        return self

    @property
    def ratio(self) -> float:
        return 1.0 if self.mask_ratio is None else self.mask_ratio


def check_selective(modality: str, spec: "ModalitySpec") -> None:
    """Refuse adapter keys next to `selective:` (they would do nothing) and `modules:` with `layernorm`."""
    if spec.selective is None:
        return
    method = spec.selective.method
    given = [key for key in ADAPTER_ONLY_KEYS if key in spec.model_fields_set and getattr(spec, key) not in (False, [])]
    if given:
        raise ValueError(f"{', '.join(f'{modality}.{k}' for k in given)}: adapter settings, but {modality} is tuned "
                         f"selectively (selective: {method}) and gets no adapter; remove them, or remove `selective` "
                         f"to put adapters on {modality}")
    if spec.layers.mode == "auto":
        raise ValueError(f"{modality}.layers: auto scores layers by the adapters it would put there, and {modality} is "
                         f"tuned selectively (selective: {method}); choose its layers yourself (e.g. `{{top: 2}}`), or "
                         f"remove `selective` to let the probe pick adapter layers")
    if method == "layernorm" and "modules" in spec.model_fields_set:
        raise ValueError(f"{modality}.modules: chooses Linear modules, but selective: layernorm trains the norms of the "
                         f"selected layers; remove `modules`, or use `selective: bias` / `full` on those modules")


class ModalitySpec(BaseModel):
    """Adapters (or selective tuning) for one modality (vision encoder, projector or language model)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Put adapters on this modality at all.")
    modules: Union[Literal["attention", "mlp", "all-linear"], list[str]] = Field(
        default="all-linear",
        description="Which Linear modules: `attention`, `mlp`, `all-linear`, or a list mixing those kinds with "
        "leaf names inside a layer (`q_proj`, `self_attn.o_proj`, `attn.qkv`) or projector (`linear_1`).",
    )
    layers: LayerSelection = Field(
        default_factory=LayerSelection,
        description="Which layers: `all`, `{top: N}`, `{bottom: N}`, `{fraction: F}` (top share) or indices/ranges "
        "like `[0, \"4-7\", -1]`, or `auto` / `{auto: {top_k: N}}` / `{auto: {budget: 2M}}`: chosen by a gradient "
        "probe on the first training batches (AutoLayers, docs/layers-auto.md). For the projector only where it has layers of its own (BLIP-2's Q-Former); an error elsewhere.",
    )
    include: list[Literal["patch_embed", "embed_tokens", "lm_head"]] = Field(
        default_factory=list,
        description="Opt-in modules outside the layers: `patch_embed` (vision conv) or `embed_tokens`/`lm_head` "
        "(language). Never targeted unless listed.",
    )
    r: int | None = Field(default=None, ge=1, description="LoRA rank for this modality (default: top-level `r`).")
    alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha for this modality (default: keeps the top-level alpha/r ratio)."
    )
    init: Optional[Literal[INITS]] = Field(
        default=None, description="How this modality's LoRA factors start (default: top-level `init`); see `init` "
        "of the block and docs/methods.md.",
    )
    full: bool = Field(
        default=False,
        description="Projector only: train the whole projector (PEFT modules_to_save) instead of adapters on it.",
    )
    schedule: Any = Field(
        default="static",
        description="Which targeted layers train when (docs/schedules.md): `static`; `{type: top_down, start: K, "
        "step_layers: S, every: N-or-fraction}`; `{type: custom, stages: [{at: N-or-fraction, layers: ...}]}`. "
        "Projector: `always`, `{from: N}`, `{until: N}`.",
    )
    lr: float = Field(default=1.0, gt=0, description="Learning-rate multiplier for this modality's optimizer group.")
    lr_decay: float | None = Field(
        default=None, gt=0, le=1,
        description="Layer-wise LR decay: layer i trains at lr x lr_decay^(top targeted layer - i), one group per layer.",
    )
    selective: Optional[SelectiveSpec] = Field(
        default=None,
        description="Train this modality's own weights instead of adapters (docs/selective.md): `layernorm`, "
        "`bias`, `full`, or `{method: spider, mask_ratio: 0.1}`; `layers`/`modules` choose where.",
    )

    @field_validator("modules")
    @classmethod
    def _modules_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list selects nothing; write `all-linear` or disable the modality with `false`")
        return value

    def kinds_and_names(self) -> tuple[set[str], list[str]]:
        items = [self.modules] if isinstance(self.modules, str) else list(self.modules)
        kinds = {i for i in items if i in KINDS}
        return kinds, [i for i in items if i not in KINDS]


class KeepSpec(BaseModel):
    """`keep:`, learn the new task without forgetting (docs/keep.md). Next to the task loss, the model answers
    unlabelled keep prompts (the old skills' questions about the fine-tuning images, or your own keep data)
    the way its own base does: the base is the same model with its adapters switched off, so there is no
    second copy. No labels are needed."""

    model_config = ConfigDict(extra="forbid")

    prompts: Union[list[str], str, None] = Field(
        default=None,
        description="Questions of every skill to keep (a skill with no question is not kept), as a list or a text "
        "file with one prompt per line. Asked about `images`.",
    )
    images: Union[str, list[str]] = Field(
        default="train",
        description="Images the prompts are asked about: `train` (the training batches' own images), `none` "
        "(text-only prompts), a folder of images, or a list of image files.",
    )
    data: Optional[str] = Field(
        default=None,
        description="A JSON/JSONL file of unlabelled conversations (`messages` with role/content, or sharegpt "
        "`conversations` with from/value; optional `images`); only the user turns are read.",
    )
    target: Literal["kl", "answers"] = Field(
        default="kl",
        description="`kl`: match the base's next-token distributions along its own greedy answer (end-of-turn "
        "included), computed on the fly with adapters off; `answers`: cross-entropy on the base's own greedy answers, generated once before "
        "training (cheaper per step).",
    )
    weight: float = Field(default=0.2, description="Weight of the keep term in the total loss (after the ramp).")
    ramp: float = Field(
        default=1.0,
        description="Share of training over which the weight rises linearly from 0 (1.0 = all of training, 0.5 = the "
        "first half; 0 = full weight from step 0, which can stall the new task).",
    )
    ramp_steps: Optional[int] = Field(default=None, ge=0, description="The ramp in optimizer steps instead of a share of training.")
    batch_size: Optional[int] = Field(
        default=None, ge=1,
        description="Keep rows per optimizer step (`per: step`), spread over its gradient-accumulation micro-batches; "
        "default: half the step's training rows, at least 1 (the demo's 16 rows per step get 8). Each keep row costs "
        "about a training row's forward and backward, so the ratio sets the cost: docs/keep.md.",
    )
    per: Literal["step", "micro-batch"] = Field(
        default="step",
        description="`step`: `batch_size` keep rows per optimizer step, however many micro-batches accumulate into it; "
        "`micro-batch`: `batch_size` rows in every micro-batch (before 2026-12: with accumulation 8, 8 x the rows).",
    )
    every: int = Field(
        default=1, ge=1,
        description="Run the keep batch every k optimizer steps only, with its weight multiplied by k: about "
        "1/k of the keep overhead.",
    )
    refresh: int = Field(
        default=1, ge=1,
        description="New keep rows, and the base's targets for them, every k micro-batches; in between the same rows "
        "are asked again (the base is frozen, so its targets do not go stale). About 1/k of the adapter-off "
        "decoding, with the keep term on every step (unlike `every`).",
    )
    fuse: bool = Field(
        default=True,
        description="Run the keep rows inside the training batch's own forward and backward (appended, unlabelled) "
        "instead of a forward of their own: cheaper where per-forward costs dominate (small models, CPU); the "
        "forward then holds logits for every keep position, more memory on a large-vocabulary model. A batch the "
        "keep rows cannot join (other inputs) gets the separate forward.",
    )
    pool: int = Field(
        default=256, ge=1,
        description="Most keep rows built before training (prompts x images, or conversations), cycled through "
        "during training; with `images: train` and `target: answers` the images come from the first training rows.",
    )
    answer_tokens: int = Field(default=16, ge=1, description="Longest base answer generated (target `answers`, the log) "
                               "or followed (target `kl`: one no-grad forward per token per step; 1 = first token only).")

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list):
            value = [p.strip() for p in value if isinstance(p, str)]
            if not any(value):
                raise ValueError("the prompt list is empty; write the questions of the skills to keep, e.g. "
                                 "[\"what is the colour of the shape?\", \"what shape is in the image?\"]")
            if any(not p for p in value):
                raise ValueError("a prompt is blank; remove it or write the question")
        elif isinstance(value, str):
            from .keep.sources import read_prompts  # reads the file now: bad input fails before weights load

            read_prompts(value)
        return value

    @field_validator("images")
    @classmethod
    def _images(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty image list; write `train` (the training images), `none`, a folder or image files")
        from .keep.sources import resolve_images

        resolve_images(value)
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value):
        if value is not None:
            from pathlib import Path

            from .keep.sources import read_conversations

            read_conversations(Path(value))
        return value

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"{value:g} is negative; write a positive weight such as 0.2 (the keep term's share of the loss)")
        if value == 0:
            raise ValueError("0 turns keep into a no-op; remove the `keep:` block or write a positive weight such as 0.2")
        return value

    @field_validator("ramp")
    @classmethod
    def _ramp(cls, value: float) -> float:
        if value > 1:
            raise ValueError(f"{value:g} is above 1; ramp is a share of training (0.5 = the first half). For a number "
                             f"of optimizer steps write `ramp_steps: {value:g}`")
        if value < 0:
            raise ValueError(f"{value:g} is negative; write a share of training between 0 and 1, such as 0.5")
        return value

    @model_validator(mode="after")
    def _has_source(self) -> "KeepSpec":
        if self.prompts is None and self.data is None:
            raise ValueError("keep has nothing to keep: write `prompts:` (questions of the skills to keep, or a text "
                             "file with one per line) or `data:` (a JSONL file of unlabelled conversations)")
        return self


class MMTuningConfig(BaseModel):
    """The `mmtuning:` block: per-modality adapter targets and the adapter method."""

    model_config = ConfigDict(extra="forbid")

    vision: ModalitySpec = Field(
        default_factory=lambda: ModalitySpec(enabled=False),
        description="Vision encoder adapters. Off unless this key is given.",
    )
    projector: ModalitySpec = Field(default_factory=ModalitySpec, description="Projector (connector) adapters. On by default.")
    language: ModalitySpec = Field(default_factory=ModalitySpec, description="Language model adapters. On by default.")
    method: str = Field(
        default="lora",
        description="Adapter method, by registered name: `lora`, `ia3`, `loha`, `lokr`, `adapter` (bottleneck "
        "adapters after attention/MLP blocks), `moe-lora` (LoRA experts routed per token by modality), or a "
        "plugin's. A block gives its options: `{name: moe-lora, experts: 4}`. See docs/methods.md.",
    )
    method_options: Any = Field(
        default_factory=dict, validate_default=True,
        description="The method's own options (what the `method:` block form writes besides `name`).",
    )
    init: Literal[INITS] = Field(
        default="lora",
        description="How LoRA factors start, per modality through `vision: {init: ...}`: `lora` (B = 0); calibrated "
        "from each base weight: `pissa` (its principal singular components), `milora` (its minor ones), `olora` "
        "(its QR); from the base weight and the data: `corda` (W times the inputs' covariance on the first "
        "`init_batches` training batches). The calibrated start is cancelled by a frozen copy inside the same factors "
        "(rank 2r saved), so training starts from the base and the adapter-off model stays the base (keep, eval). "
        "docs/methods.md.",
    )
    init_batches: int = Field(
        default=8, ge=1, description="Training batches `init: corda` reads (one forward each, before wrapping) for "
        "each module's input covariance.",
    )
    r: int = Field(default=16, ge=1, description="Default rank for every modality.")
    alpha: float = Field(default=32, gt=0, description="Default alpha (LoRA scaling is alpha / r).")
    dropout: float | None = Field(
        default=None, ge=0, lt=1,
        description="Adapter dropout. Default 0.05, or 0 when a bare projector weight is adapted (Gemma 3): "
        "PEFT's target_parameters wrapper has no dropout.",
    )
    use_dora: bool = Field(default=False, description="DoRA (weight-decomposed LoRA); method `lora` only.")
    use_rslora: bool = Field(default=False, description="rsLoRA scaling alpha / sqrt(r); method `lora` only.")
    quant: Optional[QuantPolicy] = Field(
        default=None,
        description="Quantization per modality: `balanced`, `all-4bit`, `language-4bit`, `none` or a block (see "
        "docs/quantization.md). Absent: mmtuning leaves quantization to the host.",
    )
    losses: dict[str, Any] = Field(
        default_factory=dict,
        description="Alignment losses and forgetting regularizers added to the task loss, by registered name "
        "(`contrastive`, `anchor`, `sculpt`, `multiscale`, or a plugin's): `{anchor: {weight: 0.1}}`. See docs/losses.md.",
    )

    keep: Optional[KeepSpec] = Field(
        default=None,
        description="Keep the base model's answers on keep prompts while learning the new task (a regularizer "
        "toward the adapter-off model; see KeepSpec and docs/keep.md). Absent: off.",
    )

    @field_validator("losses", mode="before")
    @classmethod
    def _validate_losses(cls, value: Any) -> Any:
        return validate_losses(value)

    @model_validator(mode="before")
    @classmethod
    def _method_block(cls, data: Any) -> Any:
        return split_method(data) if isinstance(data, dict) else data

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        validate_method_options(value, {})
        return value

    @field_validator("method_options")
    @classmethod
    def _method_options(cls, value: Any, info) -> Any:
        method = info.data.get("method")
        return value if method is None else validate_method_options(method, value)

    @model_validator(mode="before")
    @classmethod
    def _modality_shorthand(cls, data: Any) -> Any:
        """`vision: false` turns a modality off; `vision: true` or `vision: {}` turns it on with defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for modality in ("vision", "projector", "language"):
            value = data.get(modality)
            if isinstance(value, bool) or value in ("off", "on"):
                data[modality] = {"enabled": value in (True, "on")}
            elif value is None and modality in data:
                data[modality] = {}
        return data

    @field_validator("vision", "projector", "language")
    @classmethod
    def _schedule(cls, spec: "ModalitySpec", info) -> "ModalitySpec":
        _check_schedule_keys(info.field_name, spec)
        return spec

    @model_validator(mode="after")
    def _check_combinations(self) -> "MMTuningConfig":
        for modality in ("vision", "projector", "language"):
            spec: ModalitySpec = getattr(self, modality)
            allowed = EXTRAS_BY_MODALITY[modality]
            wrong = [item for item in spec.include if item not in allowed]
            if wrong:
                raise ValueError(f"{modality}.include: {wrong} do not belong to {modality}; allowed: {list(allowed) or 'none'}")
            check_selective(modality, spec)
            if spec.layers.mode == "auto" and modality == "projector":
                raise ValueError("projector.layers: auto ranks vision and language layers; write the projector's layers "
                                 "yourself (or remove `layers` from it)")
            if spec.full and modality != "projector":
                raise ValueError(f"{modality}.full: only the projector can be trained whole; use adapters on {modality}")
        if self.projector.full and self.quant is not None and self.quant.projector != "none":
            raise ValueError(f"projector.full trains the projector whole, but quant.projector is {self.quant.projector} "
                             f"(a packed quantized weight cannot be trained whole); use LoRA on it (remove `full: true`) "
                             f"or keep it 16-bit (quant.projector: none, or quant: balanced)")
        if (self.use_dora or self.use_rslora) and self.method != "lora":
            raise ValueError(f"use_dora/use_rslora need method: lora (got method: {self.method})")
        calibrated = sorted({self.init_of(m) for m in MODALITIES if getattr(self, m).enabled} - {"lora"})
        if calibrated and self.method != "lora":
            raise ValueError(f"init: {calibrated[0]} starts LoRA factors from the base weights; it needs method: lora "
                             f"(got method: {self.method}); remove `init`, or write method: lora")
        if calibrated and self.use_dora:
            raise ValueError(f"init: {calibrated[0]} and use_dora: DoRA's magnitude is taken from the weight plus the "
                             f"starting delta, which a calibrated start makes non-zero; use one of them")
        method = registered_methods()[self.method]
        method.check(self)
        for name, options in method.default_losses(self.method_options).items():
            self.losses.setdefault(name, validate_losses({name: options})[name])
        if not any(getattr(self, m).enabled for m in ("vision", "projector", "language")):
            raise ValueError("every modality is disabled, so nothing would train; enable at least one of vision, projector, language")
        return self

    def spec(self, modality: str) -> ModalitySpec:
        return getattr(self, modality)

    def rank(self, modality: str) -> int:
        return self.spec(modality).r or self.r

    def init_of(self, modality: str) -> str:
        return self.spec(modality).init or self.init

    def inits_from_data(self) -> list[str]:
        """The enabled modalities' inits that read training batches before wrapping."""
        return sorted({self.init_of(m) for m in MODALITIES if self.spec(m).enabled} & set(INITS_FROM_DATA))

    def scale_alpha(self, modality: str) -> float:
        spec = self.spec(modality)
        if spec.alpha is not None:
            return spec.alpha
        return self.alpha * self.rank(modality) / self.r


def _check_schedule_keys(modality: str, spec: ModalitySpec) -> None:
    """Parse `schedule:` into its object (registered schedule types) and refuse settings that would do nothing."""
    if not spec.enabled:
        inert = sorted(spec.model_fields_set - {"enabled"})
        if inert or spec.schedule not in ("static", "always", None) or spec.lr != 1.0 or spec.lr_decay is not None:
            keys = ", ".join(f"{modality}.{key}" for key in inert) or "schedule/lr/lr_decay"
            raise ValueError(f"{keys}: given while {modality} is disabled ({modality}: false), where it would do "
                             f"nothing; remove the setting, or enable {modality} (`{modality}: {{enabled: true, ...}}`, "
                             f"--set {modality}=true)")
        return
    if modality == "projector" and spec.lr_decay is not None:
        raise ValueError("lr_decay: the projector has no layers; use projector.lr")
    spec.schedule = parse_schedule(spec.schedule, modality, where="schedule")


def load_config(data: Any, where: str = "mmtuning") -> MMTuningConfig:
    """Validate a `mmtuning:` block; errors name the YAML key (`mmtuning.vision.layers`) and the fix."""
    if isinstance(data, MMTuningConfig):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MMTuningError(f"{where}: expected a mapping of settings (vision:, projector:, language:, ...), "
                            f"got {type(data).__name__} {data!r}.")
    try:
        return MMTuningConfig.model_validate(data)
    except ValidationError as error:
        raise MMTuningError(format_validation_error(error, where)) from None


def format_validation_error(error: ValidationError, where: str) -> str:
    lines = validation_lines(error, where, valid=_valid_keys)
    return "Invalid mmtuning settings:\n  " + "\n  ".join(lines)


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = MMTuningConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
