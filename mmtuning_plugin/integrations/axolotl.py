"""The Axolotl integration: an `mmtuning:` block in an Axolotl YAML.

    plugins:
      - mmtuning_plugin.integrations.axolotl.MMTuningPlugin
    mmtuning:
      vision:    {modules: attention, layers: {top: 8}, r: 8}
      projector: {r: 16}
      language:  {modules: all-linear, r: 16}

The plugin translates mmtuning's exact target plan into Axolotl's own LoRA settings (so Axolotl builds the
PEFT model as usual) and calls the host contract's phases (session.PHASES) at Axolotl's hooks (0.21):
`register` (raw YAML, before validation: `settings`, and `load`: the quantization skip list) -> `load_datasets`
(only under `layers: auto`: Axolotl's own loading, kept for the probe) -> `pre_lora_load` (`loaded`: plan again
on the real model, probing its first batches under `layers: auto`, quantization verified) -> `post_model_load`
(`adapters`: PEFT wrapped exactly the plan) -> `get_trainer_cls` (`trainer`: the mixin with optimizer groups,
loss terms, the pre-training check) -> `add_callbacks_pre_trainer` (schedules, losses, keep, `report`) ->
`post_trainer_create` (keep gets Axolotl's processor and template). Without an `mmtuning:` block every hook
returns at once: Axolotl auto-registers installed plugins on every run.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, field_validator

from ..config import load_config
from ..errors import MMTuningError
from ..host_settings import AXOLOTL, describe_plan, effective_settings, replaced_targets, targets_warning, unset
from ..session import MMTuning
from ..targets import TargetPlan
from ..sharding import deepspeed_problems, fsdp_problems, fsdp_request_from, zero_stage
from .hf import MMTuningTrainerMixin, first_batches

LOG = logging.getLogger("axolotl.integrations.mmtuning")  # under Axolotl's logger: shown at INFO
BLOCK = "mmtuning"
# Axolotl keys mmtuning sets from the plan, beyond the target keys it replaces with a warning (AXOLOTL.targets):
# a YAML that sets one of them asks for something the plan decides, so it is refused.
OWNED_TARGET_KEYS = ("lora_target_parameters", "lora_rank_pattern", "lora_alpha_pattern", "lora_modules_to_save",
                     "peft_layers_to_transform", "peft_layers_pattern")
# Axolotl keys that build their own optimizer groups, which would replace the per-modality ones.
OPTIMIZER_GROUP_KEYS = ("lr_groups", "loraplus_lr_ratio", "embedding_lr", "embedding_lr_scale")
# Fused LoRA kernels are auto-enabled for lora/qlora; they fail on LLaVA ("could not import attention
# class") and were never checked with per-modality plans on vision-language models.
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# `axolotl merge-lora` defaults to its memory-efficient merge, which in Axolotl 0.21 drops the language-model LoRA
# of LLaVA-family models (its `_scope_renaming` ignores transformers' `base_model_prefix` for the inner
# `^language_model.model` rule; plain LLaVA runs too). The legacy merge is PEFT's merge_and_unload on the loaded
# model, correct for every modality: the plugin writes `merge_method: legacy` unless the YAML or
# `--merge-method` chose one.
MERGE_METHOD = "legacy"


class MMTuningArgs(BaseModel):
    """Merged into Axolotl's config schema: the `mmtuning:` block, validated by the core's MMTuningConfig."""

    mmtuning: Optional[dict[str, Any]] = None

    @field_validator("mmtuning", mode="before")
    @classmethod
    def _validate_block(cls, value: Any) -> Any:
        if value is not None:
            try:
                load_config(value, BLOCK)
            except MMTuningError as error:
                raise ValueError(str(error)) from None
        return value


class MMTuningPlugin(BasePlugin):
    """mmtuning's target plans, checks, optimizer groups and loss terms inside an Axolotl run."""

    def __init__(self) -> None:
        super().__init__()
        self.session: MMTuning | None = None
        self.dataset_meta: Any = None  # Axolotl's loaded datasets, kept under `layers: auto` for the probe
        self._choosing_trainer = False

    def get_input_args(self) -> str:
        return f"{__name__}.MMTuningArgs"

    @staticmethod
    def active(cfg: Any) -> bool:
        return cfg is not None and cfg.get(BLOCK) is not None

    # --- before validation ---------------------------------------------------------------------------

    def register(self, cfg: Any) -> None:
        """Plan on the model's meta skeleton and write Axolotl's LoRA and quantization settings into the YAML."""
        if not self.active(cfg):
            self.session = None
            return
        install_clean_errors()
        self.session = MMTuning.for_host(with_inline_keep_images(cfg.get(BLOCK)), cfg, AXOLOTL, where=BLOCK,
                                         source="the Axolotl YAML", quant_bits=loaded_bits(cfg),
                                         problems=owned_key_conflicts(cfg),
                                         checks=lambda session: host_problems(cfg, session))
        self.session.log = log_line
        cfg[BLOCK] = self.session.block  # with Axolotl's lora_r/lora_alpha/lora_dropout as its defaults
        model_config = load_host_model_config(cfg)
        from ..loading import build_skeleton

        plan = self.session.plan_ahead(build_skeleton(model_config))
        replaced = replaced_targets(cfg, AXOLOTL)
        if replaced:
            LOG.warning("mmtuning: %s", targets_warning(replaced, plan, AXOLOTL.host))
        write_lora_settings(cfg, plan)
        LOG.info("mmtuning: %s planned for %s; Axolotl's LoRA settings now name them exactly",
                 describe_plan(plan), plan.model_type)
        LOG.info("mmtuning: effective LoRA settings: %s", effective_settings(self.session.config))
        if self.session.needs_probe():
            LOG.info("mmtuning: layers: auto - every layer is planned until the probe chooses on the run's first "
                     "batches, before wrapping")
        for key in LORA_KERNEL_KEYS:
            if cfg.get(key) is None:
                cfg[key] = False
        if cfg.get("merge_method") is None and axolotl_has_merge_methods():  # read only by `axolotl merge-lora`
            cfg["merge_method"] = MERGE_METHOD
        quant = self.session.bnb_config_kwargs(model_config)
        if quant:
            cfg["bnb_config_kwargs"] = merge_bnb_kwargs(quant, cfg.get("bnb_config_kwargs"))

    def on_config_validation_error(self, cfg: Any) -> None:
        self.session = None

    # --- model -------------------------------------------------------------------------------------------

    def load_datasets(self, cfg: Any, preprocess: bool = False):
        """Under `layers: auto`: Axolotl's own dataset loading (the same call Axolotl makes), kept so that the probe
        reads the run's first rows before the wrap. Otherwise None: Axolotl loads them itself."""
        self.dataset_meta = None
        if not self.active(cfg) or preprocess or not self.require_session(cfg).needs_probe():
            return None
        from axolotl.common.datasets import load_datasets

        self.dataset_meta = load_datasets(cfg=cfg)
        return self.dataset_meta

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """The `loaded` phase: plan again on the model Axolotl really built (its class decides the names), under
        `layers: auto` probing the run's first batches first, check its quantization against `quant:`, and write
        that plan into Axolotl's LoRA settings."""
        if not self.active(cfg):
            return
        session = self.require_session(cfg)
        meta = self.dataset_meta
        batches = probe_batches(cfg, model, meta.train_dataset) if session.needs_probe() and meta else None
        if session.needs_probe() and batches is None:
            session.plan_for(model)  # Axolotl wraps by itself, so no later wrap would: refused here, naming the data
        write_lora_settings(cfg, session.after_load(model, batches, seed=cfg.get("seed") or 0, log=LOG.info))

    def post_model_load(self, cfg: Any, model: Any) -> None:
        """The `adapters` phase: PEFT wrapped exactly the planned modules, parameters and ranks."""
        if not self.active(cfg):
            return
        session = self.require_session(cfg)
        session.verify(model)
        LOG.info("mmtuning: PEFT wrapped exactly the plan (%s)", describe_plan(session.require_plan()))

    # --- trainer -----------------------------------------------------------------------------------------

    def get_trainer_cls(self, cfg: Any):
        """Axolotl's own choice of trainer class, with mmtuning's optimizer groups and loss terms mixed in."""
        if not self.active(cfg) or self._choosing_trainer:
            return None
        self._choosing_trainer = True
        try:
            base = axolotl_trainer_cls(cfg)
        finally:
            self._choosing_trainer = False
        session = self.require_session(cfg)
        return type(f"MMTuning{base.__name__}", (MMTuningTrainerMixin, base), {"mmtuning": session})

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        """Schedules, losses, keep and the run report (`mmtuning_report.json`)."""
        if not self.active(cfg):
            return []
        return list(self.require_session(cfg).callbacks())

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Keep prompts get the run's own processor and chat template (the trainer builds the keep rows in train(),
        after checking, past Axolotl's `unfrozen_parameters`/`freeze_mm_modules`, that exactly the plan trains)."""
        if not self.active(cfg):
            return
        session = self.require_session(cfg)
        if session.keep is not None:
            hand_over_keep_template(session, trainer)

    def require_session(self, cfg: Any) -> MMTuning:
        if self.session is None:  # a programmatic run that skipped register(): build it from the validated cfg
            self.session = MMTuning.for_host(cfg.get(BLOCK), cfg, AXOLOTL, where=BLOCK, source="the Axolotl YAML",
                                             quant_bits=loaded_bits(cfg))
            self.session.log = log_line
        return self.session


# --- settings ----------------------------------------------------------------------------------------


def loaded_bits(cfg: Any) -> int | None:
    """The bits Axolotl loads the model in: 4 (`load_in_4bit`), 8 (`load_in_8bit`) or None (16-bit)."""
    return 4 if cfg.get("load_in_4bit") else 8 if cfg.get("load_in_8bit") else None


def log_line(line: str) -> None:
    LOG.info("mmtuning: %s", line)


def host_problems(cfg: Any, session: MMTuning) -> list[str]:
    """Axolotl settings that cannot work with the block, each naming what to write instead (refused together with
    the contradictions, before anything loads)."""
    problems = []
    adapter = cfg.get("adapter")
    if adapter not in ("lora", "qlora"):
        problems.append(f"adapter: {adapter!r} (the `mmtuning:` block plans LoRA adapters; write `adapter: lora` or "
                        f"`adapter: qlora` with load_in_4bit: true, or remove the `mmtuning:` block)")
    if session.config.method != "lora":
        problems.append(f"mmtuning.method: {session.config.method} (Axolotl builds LoRA adapters only; write `method: "
                        f"lora` (use_dora/use_rslora are available) or use the transformers Trainer integration)")
    calibrated = sorted({session.config.init_of(m) for m in ("vision", "projector", "language")} - {"lora"})
    if calibrated:
        problems.append(f"mmtuning.init: {calibrated[0]} (Axolotl builds its LoRA itself, so mmtuning cannot start it "
                        f"from the base weights; remove `init` or use the transformers Trainer or LLaMA-Factory)")
    if cfg.get("rl"):
        problems.append(f"rl: {cfg.get('rl')} (the mmtuning Axolotl plugin supports supervised fine-tuning runs only; "
                        f"remove `rl:` or the `mmtuning:` block)")
    problems += [f"{key}: builds its own optimizer parameter groups, which would replace mmtuning's per-modality "
                 f"groups (remove `{key}` from the YAML)" for key in OPTIMIZER_GROUP_KEYS if cfg.get(key) is not None]
    if session.keep is not None and session.keep.sources.has_images and not cfg.get("processor_type"):
        problems.append("mmtuning.keep: the keep prompts carry images, but this Axolotl run has no `processor_type`, "
                        "so it builds no multimodal collator and has no processor for them (add `processor_type: "
                        "AutoProcessor` with skip_prepare_dataset: true, remove_unused_columns: false, or write "
                        "`keep.images: none`)")
    problems += fsdp_problems(fsdp_request_from({"fsdp_version": cfg.get("fsdp_version"),
                                                 "fsdp_config": cfg.get("fsdp_config")}), session.config)
    problems += deepspeed_problems(zero_stage(cfg.get("deepspeed")), session.config)
    adapted = [m for m in ("vision", "projector") if session.config.spec(m).enabled]
    if cfg.get("freeze_mm_modules") and adapted:
        problems.append(f"freeze_mm_modules: true would freeze the {' and '.join(adapted)} adapters that the "
                        f"`mmtuning:` block asks for (base weights stay frozen anyway; remove freeze_mm_modules, or "
                        f"write `mmtuning.{adapted[0]}: false`)")
    return problems


INLINE_IMAGE_KEYS = ("path", "base64", "url", "image")  # how Axolotl's multimodal rows carry an image part


def with_inline_keep_images(block: Any) -> Any:
    """`keep.data` in Axolotl's own multimodal row format (image parts carrying `path`/`base64`/`url` inline, as
    in its training data): the user turns with their images saved as files, written as keep-data JSONL in a
    temporary folder that the block then names. Other files are left to the core reader; user files are only read."""
    keep = block.get("keep") if isinstance(block, dict) else None
    name = keep.get("data") if isinstance(keep, dict) else None
    if not isinstance(name, str) or not Path(name).is_file():
        return block
    source = Path(name)
    try:
        text = source.read_text(encoding="utf-8")
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError):
        return block  # the core reader names the bad line and the fix
    if not any(inline_image(part) for record in records for part in image_parts(record)):
        return block
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mmtuning-keep-"))
    atexit.register(shutil.rmtree, folder, True)
    rows = [inline_row(record, number, source, folder) for number, record in enumerate(records, 1)]
    target = folder / f"{source.stem}.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # the same mapping types back (Axolotl's DictDefault): with plain dicts here Axolotl's validate_config failed
    # in model_dump ("'None' is not an instance of 'SchemaSerializer'")
    return type(block)({**block, "keep": type(keep)({**keep, "data": str(target)})})


def image_parts(record: Any) -> list[dict[str, Any]]:
    turns = record.get("messages", record.get("conversations")) if isinstance(record, dict) else None
    return [part for turn in turns or [] if isinstance(turn, dict) and isinstance(turn.get("content"), list)
            for part in turn["content"] if isinstance(part, dict) and part.get("type") == "image"]


def inline_image(part: dict[str, Any]) -> bool:
    return any(isinstance(part.get(key), str) for key in INLINE_IMAGE_KEYS)


def inline_row(record: Any, number: int, source: Path, folder: Path) -> dict[str, Any]:
    """One Axolotl row as a keep-data row: its first user turn, `<image>` where each image part stands."""
    turns = record.get("messages", record.get("conversations")) if isinstance(record, dict) else None
    user = next((t for t in turns or [] if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human")),
                None)
    if user is None:
        raise MMTuningError(f"mmtuning.keep.data: record {number} of {source} has no user turn; keep data needs the "
                            f"user's question (role `user`).")
    content = user.get("content", user.get("value"))
    parts = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    text, images = "", []
    for part in parts:
        if part.get("type") == "image":
            text += "<image>"
            images.append(inline_image_file(part, number, source, folder, len(images)))
        else:
            text += str(part.get("text", ""))
    return {"messages": [{"role": "user", "content": text}], "images": images}


def inline_image_file(part: dict[str, Any], number: int, source: Path, folder: Path, index: int) -> str:
    import base64
    import binascii

    if isinstance(part.get("base64"), str):
        target = folder / f"{number}-{index}.img"
        try:
            target.write_bytes(base64.b64decode(part["base64"].split(",")[-1], validate=True))
        except (binascii.Error, ValueError):
            raise MMTuningError(f"mmtuning.keep.data: record {number} of {source} has an image part whose `base64` "
                                f"is not base64; write the image's bytes base64-encoded, or `path:`.") from None
        return str(target)
    path = part.get("path") or part.get("image") or part.get("url") or ""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        raise MMTuningError(f"mmtuning.keep.data: record {number} of {source} names the image {path}; keep data "
                            f"reads local images only (no downloads before training): save it and write `path:`.")
    found = Path(path) if Path(path).is_absolute() or Path(path).is_file() else source.parent / path
    return str(found.absolute())


def hand_over_keep_template(session: MMTuning, trainer: Any) -> None:
    """Axolotl's multimodal collator holds the run's processor and the chat template it renders rows with; a
    text-only run hands over its tokenizer (Axolotl set its chat template). The keep report goes to Axolotl's log
    (its logging drops INFO lines of loggers outside `axolotl`)."""
    strategy = getattr(trainer.data_collator, "processing_strategy", None)
    if strategy is not None:
        session.use_keep_template(processor=strategy.processor, chat_template=strategy.chat_template, log=LOG.info)
    else:
        session.use_keep_template(processor=trainer.processing_class, log=LOG.info)


def probe_batches(cfg: Any, model: Any, dataset: Any):
    """The run's first micro-batches, collated by the collator Axolotl's trainer builder builds for this config
    (its multimodal chat collator under `processor_type`), from the tokenizer and processor Axolotl loads."""
    from axolotl.core.builders.causal import HFCausalTrainerBuilder
    from axolotl.loaders import load_processor, load_tokenizer
    from axolotl.utils.chat_templates import get_chat_template_from_config

    tokenizer = load_tokenizer(cfg)
    processor = load_processor(cfg, tokenizer) if cfg.get("processor_type") else None
    args = SimpleNamespace(  # the training-argument fields build_collator reads
        pretraining=bool(cfg.get("pretraining_dataset")), sample_packing=bool(cfg.get("sample_packing")),
        eval_sample_packing=bool(cfg.get("eval_sample_packing")), image_size=cfg.get("image_size"),
        image_resize_algorithm=cfg.get("image_resize_algorithm"),
        chat_template=get_chat_template_from_config(cfg=cfg, tokenizer=tokenizer) if cfg.get("chat_template") else None)
    collator = HFCausalTrainerBuilder(cfg, model, tokenizer, processor).build_collator(args, padding=True)
    return first_batches(dataset, collator, cfg.get("micro_batch_size") or 1)


def lora_settings(plan: TargetPlan) -> dict[str, Any]:
    """Axolotl's names for the plan: exact module names, patterns keyed by escaped full names."""
    config = plan.config
    return {
        "lora_r": plan.r,
        "lora_alpha": plan.alpha,
        "lora_dropout": plan.dropout,
        "lora_target_modules": plan.peft_target_modules or [],
        "lora_target_parameters": plan.target_parameters or None,
        "lora_rank_pattern": plan.rank_pattern or None,
        "lora_alpha_pattern": plan.alpha_pattern or None,
        "lora_modules_to_save": plan.modules_to_save or None,
        "peft_use_dora": config.use_dora or None,
        "peft_use_rslora": config.use_rslora or None,
    }


def owned_key_conflicts(cfg: Any) -> list[str]:
    """Axolotl keys that choose what the plan chooses (patterns, layers, whole modules): each a contradiction."""
    return [f"`{key}: {cfg.get(key)}` (the `mmtuning:` block plans this itself; remove `{key}` and use "
            f"mmtuning.<modality>.r/.alpha/.layers, or projector.full / language.include)"
            for key in OWNED_TARGET_KEYS if not unset(cfg.get(key))]


def write_lora_settings(cfg: Any, plan: TargetPlan) -> None:
    """Axolotl's LoRA keys from the plan (the host's r/alpha/dropout already went into the block as defaults)."""
    for key, value in lora_settings(plan).items():
        cfg[key] = value
    cfg["lora_target_linear"] = None


def install_clean_errors() -> None:
    """An MMTuningError that reaches the top of an Axolotl run prints as one message, not a 50-line traceback.

    Axolotl's CLI lets every exception from plugin hooks and config validation escape as a traceback; the
    previous hook still handles every other exception."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "mmtuning", False):
        return

    def hook(kind, error, traceback):
        if isinstance(error, MMTuningError):
            sys.stderr.write(f"\nmmtuning: error: {error}\n")
        else:
            previous(kind, error, traceback)

    hook.mmtuning = True
    sys.excepthook = hook


def axolotl_has_merge_methods() -> bool:
    """Axolotl 0.21's schema has `merge_method`; an older one without it gets no such key written."""
    from axolotl.utils.schemas.peft import LoraConfig

    return "merge_method" in LoraConfig.model_fields


def merge_bnb_kwargs(ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """The quantization policy's kwargs; the YAML's own bnb_config_kwargs keep their other keys."""
    theirs = dict(theirs or {})
    skip = theirs.get("llm_int8_skip_modules")
    if skip is not None and "llm_int8_skip_modules" in ours and list(skip) != list(ours["llm_int8_skip_modules"]):
        raise MMTuningError("bnb_config_kwargs.llm_int8_skip_modules conflicts with mmtuning's quantization policy, "
                            "which writes the exact skip list itself; remove it from bnb_config_kwargs.")
    return {**theirs, **ours}


def load_host_model_config(cfg: Any):
    """The transformers config of `base_model_config`/`base_model`: local dir or cached id, else the hub."""
    from transformers import AutoConfig

    from ..loading import load_model_config

    name = str(cfg.get("base_model_config") or cfg.get("base_model") or "")
    if not name:
        raise MMTuningError("base_model: missing; the `mmtuning:` block needs the model to plan its targets.")
    try:
        return load_model_config(name)
    except MMTuningError:
        if "/" not in name or Path(name).expanduser().exists():
            raise
    try:  # Axolotl downloads the model anyway: fetching its config.json here is no extra surprise
        return AutoConfig.from_pretrained(name, trust_remote_code=bool(cfg.get("trust_remote_code")),
                                          revision=cfg.get("revision_of_model"))
    except Exception as error:
        raise MMTuningError(f"base_model: {name!r} - could not read its config ({error}); the `mmtuning:` block "
                            f"needs it to plan targets. Check the name, or download it first.") from None


# --- trainer -----------------------------------------------------------------------------------------


def axolotl_trainer_cls(cfg: Any):
    """The trainer class Axolotl itself would pick for this config (other plugins' choices included)."""
    from axolotl.core.builders.causal import HFCausalTrainerBuilder
    from axolotl.core.trainers.base import AxolotlTrainer

    choose = getattr(HFCausalTrainerBuilder, "_get_trainer_cls", None)
    if choose is None:
        return AxolotlTrainer
    return choose(SimpleNamespace(cfg=cfg))
