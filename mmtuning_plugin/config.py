"""`MMTuningConfig`: the one schema of the `mmtuning:` block, for every host and the CLI.

docs/config.md is generated from these models (`python -m mmtuning_plugin.docgen`), so field
descriptions here are the user documentation.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MMTuningError
from .quant import QuantPolicy

KINDS = ("attention", "mlp", "all-linear")
EXTRAS_BY_MODALITY = {"vision": ("patch_embed",), "projector": (), "language": ("embed_tokens", "lm_head")}
_RANGE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")


class LayerSelection(BaseModel):
    """Which numbered layers of a modality get adapters.

    Written as `all`, `{top: N}` / `top:N`, `{bottom: N}` / `bottom:N`, `{fraction: 0.5}` (the top half),
    or a list of indices and inclusive ranges such as `[0, 1, "4-7", -1]` / `"0-3,7"`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["all", "top", "bottom", "fraction", "indices"] = "all"
    count: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, le=1)
    indices: tuple[int, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, LayerSelection) or (isinstance(value, dict) and "mode" in value):
            return value
        if value is None or value == "all" or value == {}:
            return {"mode": "all"}
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
        return {"mode": "fraction", "fraction": number}
    if not isinstance(number, int) or isinstance(number, bool):
        raise ValueError(f"layers {{{key}: {number!r}}}: {key} takes a whole number of layers")
    return {"mode": key, "count": number}


class ModalitySpec(BaseModel):
    """Adapters for one modality (vision encoder, projector or language model)."""

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
        "like `[0, \"4-7\", -1]`. Ignored for the projector, which has no layers.",
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
        description="`kl`: match the base's next-token distribution at the answer position, computed on the fly "
        "with adapters off; `answers`: cross-entropy on the base's own greedy answers, generated once before "
        "training (cheaper per step).",
    )
    weight: float = Field(default=0.2, description="Weight of the keep term in the total loss (after the ramp).")
    ramp: float = Field(
        default=0.5,
        description="Share of training over which the weight rises linearly from 0 (0.5 = the first half; 0 = full "
        "weight from step 0, which can stall the new task).",
    )
    ramp_steps: Optional[int] = Field(default=None, ge=0, description="The ramp in optimizer steps instead of a share of training.")
    batch_size: int = Field(default=4, ge=1, description="Keep rows per training micro-batch.")
    every: int = Field(
        default=1, ge=1,
        description="Run the keep batch every k optimizer steps only, with its weight multiplied by k: about "
        "1/k of the keep overhead.",
    )
    pool: int = Field(
        default=256, ge=1,
        description="Most keep rows built before training (prompts x images, or conversations), cycled through "
        "during training; with `images: train` and `target: answers` the images come from the first training rows.",
    )
    answer_tokens: int = Field(default=16, ge=1, description="Longest base answer generated (target `answers` and the log).")

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
    method: Literal["lora", "ia3", "loha", "lokr"] = Field(default="lora", description="PEFT adapter type.")
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
        from .losses import validate_losses  # the loss registry loads plugins: import late

        return validate_losses(value)

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
            if spec.full and modality != "projector":
                raise ValueError(f"{modality}.full: only the projector can be trained whole; use adapters on {modality}")
        if self.projector.full and self.quant is not None and self.quant.projector != "none":
            raise ValueError(f"projector.full trains the projector whole, but quant.projector is {self.quant.projector} "
                             f"(a packed quantized weight cannot be trained whole); use LoRA on it (remove `full: true`) "
                             f"or keep it 16-bit (quant.projector: none, or quant: balanced)")
        if (self.use_dora or self.use_rslora) and self.method != "lora":
            raise ValueError(f"use_dora/use_rslora need method: lora (got method: {self.method})")
        if not any(getattr(self, m).enabled for m in ("vision", "projector", "language")):
            raise ValueError("every modality is disabled, so nothing would train; enable at least one of vision, projector, language")
        return self

    def spec(self, modality: str) -> ModalitySpec:
        return getattr(self, modality)

    def rank(self, modality: str) -> int:
        return self.spec(modality).r or self.r

    def scale_alpha(self, modality: str) -> float:
        spec = self.spec(modality)
        if spec.alpha is not None:
            return spec.alpha
        return self.alpha * self.rank(modality) / self.r


def _check_schedule_keys(modality: str, spec: ModalitySpec) -> None:
    """Parse `schedule:` into its object (registered schedule types) and refuse settings that would do nothing."""
    from .schedule import parse_schedule

    if not spec.enabled:
        if spec.schedule not in ("static", "always", None) or spec.lr != 1.0 or spec.lr_decay is not None:
            raise ValueError(f"schedule/lr/lr_decay are set but {modality} is disabled; enable it or remove them")
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
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in (where, *item["loc"]) if not _is_union_branch(p))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key; valid keys here are: {', '.join(_valid_keys(item['loc']))}"
        lines.append(f"{path}: {message}")
    return "Invalid mmtuning settings:\n  " + "\n  ".join(dict.fromkeys(lines))


def _is_union_branch(part: Any) -> bool:
    """pydantic tags errors inside a Union with the branch type (`literal[...]`): not a YAML key."""
    return isinstance(part, str) and "[" in part


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = MMTuningConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
