"""LLaMA-Factory (0.9.5) integration: a normal LLaMA-Factory YAML plus an `mmtuning:` block.

    mmtune llamafactory train train.yaml [key=value ...]

LLaMA-Factory has no plugin discovery, its CLI passes no callbacks and its parser rejects unknown keys.
So mmtuning reads the YAML itself, removes the `mmtuning:` block, checks that no LLaMA-Factory key
fights the block (`lora_target` vs. `mmtuning.language`), lets LLaMA-Factory's own parser check the
rest, and then calls `llamafactory.train.tuner.run_exp(args, callbacks)` with three functions replaced
for the duration of the run (see `PATCHES`): each is the only place where LLaMA-Factory decides
what the patch changes, and each is restored afterwards.

The host contract's phases (session.PHASES) run at these places: `settings` in `split_config`, `load` in the
quantization patch, `loaded` and `adapters` in the targets patch, `trainer` in the trainer subclass, `report`
in the session's callbacks.

With more than one device it re-launches itself under torchrun, like `llamafactory-cli train`; every
rank reads the same YAML and applies the same setup.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from ..errors import MMTuningError
from ..host_settings import LLAMAFACTORY, effective_settings, replaced_targets, targets_warning
from ..session import MMTuning
from ..sharding import check_deepspeed, check_fsdp, fsdp_request_from, zero_stage

SUPPORTED_VERSION = "0.9.5"

# LLaMA-Factory keys that decide what the `mmtuning:` block decides: with the block present they are an
# error, and the message says what to write instead. (lora_rank/lora_alpha/lora_dropout/use_dora/use_rslora are
# the block's defaults and lora_target is replaced by the plan: host_settings.LLAMAFACTORY.)
OWNED_KEYS: dict[str, str] = {
    "additional_target": "mmtuning.projector.full: true, or include: [embed_tokens, lm_head]",
    "freeze_vision_tower": "mmtuning.vision (off unless given; e.g. vision: {layers: {top: 4}})",
    "freeze_multi_modal_projector": "mmtuning.projector (on by default; projector: false turns it off)",
    "freeze_language_model": "mmtuning.language (language: false turns it off)",
    "resize_vocab": "mmtuning.language.include: [embed_tokens, lm_head]",
    "pissa_init": "nothing (PiSSA initialisation is not supported with an mmtuning block)",
    "use_llama_pro": "mmtuning.language.layers",
}
# Keys that make LLaMA-Factory build its own optimizer, so mmtuning's per-modality groups could not apply.
CUSTOM_OPTIMIZER_KEYS = ("loraplus_lr_ratio", "use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
# Keys that route model loading around the code mmtuning hooks into.
BYPASS_KEYS = {
    "adapter_name_or_path": "resume with resume_from_checkpoint (mmtuning creates the adapters from its plan)",
    "use_unsloth": "remove it (Unsloth builds the PEFT model itself, bypassing mmtuning's plan)",
    "use_kt": "remove it (KTransformers builds the PEFT model itself)",
    "use_mca": "remove it (mcore_adapter trains outside the transformers Trainer)",
}
FINETUNING_TYPES = ("lora",)

# Per stage: the workflow module and the name of the trainer class it instantiates. mmtuning's
# optimizer groups and extra losses go in through a subclass bound to that name (see `PATCHES`).
TRAINER_BY_STAGE: dict[str, tuple[str, str]] = {
    "sft": ("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
    "pt": ("llamafactory.train.pt.workflow", "CustomTrainer"),
}


@dataclass(frozen=True)
class Patch:
    """One function or class replaced during `run_exp`: where, and why nothing narrower exists."""

    module: str
    name: str
    why: str


PATCHES: dict[str, Patch] = {
    "targets": Patch(
        "llamafactory.model.adapter", "get_peft_model",
        "The PEFT config LLaMA-Factory builds comes from `lora_target` expanded by substring "
        "(`patch_target_modules`), which drops frozen parts and never targets the projector; this call is "
        "the one place the whole config is used, so mmtuning wraps the model there with its exact plan "
        "(rank/alpha patterns, bare projector weights) and verifies the result.",
    ),
    "quantization": Patch(
        "llamafactory.model.patcher", "configure_quantization",
        "LLaMA-Factory builds the BitsAndBytesConfig here with no skip list, so vision tower and projector "
        "are quantized; mmtuning adds its exact `llm_int8_skip_modules` (and any other policy kwargs) to the "
        "config this function just built, before the model loads.",
    ),
    "probe data": Patch(
        "llamafactory.train.sft.workflow", "get_dataset",
        "Under `layers: auto` the probe needs the run's first training batches before the model is wrapped, which "
        "LLaMA-Factory does inside load_model, right after this call built the tokenized dataset. The replacement "
        "returns the same dataset module and records it with its template, so the wrap can collate the first rows "
        "with the collator class and arguments the workflow uses next. Only patched under `layers: auto`.",
    ),
    "trainer": Patch(
        "", "",  # per stage, from TRAINER_BY_STAGE
        "LLaMA-Factory's trainers build their optimizer from one group (or its own custom optimizers) and "
        "have no extra-loss hook; callbacks only see the optimizer after it exists. A subclass with "
        "`MMTuningTrainerMixin` (the same code as the transformers integration) bound to the name the "
        "workflow instantiates is the narrowest way in.",
    ),
}


# --- reading the YAML --------------------------------------------------------------------------------


@dataclass
class Job:
    """A parsed run: LLaMA-Factory's args (without the block) and the mmtuning session."""

    args: dict[str, Any]
    session: MMTuning
    stage: str
    replaced_targets: list[str] = field(default_factory=list)  # the YAML's target keys, replaced by the plan


def read_config(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The YAML as a dict with `key=value` overrides applied (`mmtuning.vision.r=8` edits the block)."""
    from ..files import read_yaml
    from ..spec_input import apply_set

    data = read_yaml(Path(path), str(path), "a LLaMA-Factory training YAML")
    if not isinstance(data, dict):
        raise MMTuningError(f"{path}: expected a mapping of LLaMA-Factory settings, got {type(data).__name__}.")
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise MMTuningError(f"override {item!r}: write KEY=VALUE, e.g. max_steps=10 or mmtuning.vision.r=8")
        if key.strip().startswith("mmtuning."):
            block = data.get("mmtuning")
            block = {} if block is None else block
            if not isinstance(block, dict):
                raise MMTuningError(f"{path}: `mmtuning:` must be a mapping of settings to apply {item!r}.")
            apply_set(block, item.strip()[len("mmtuning."):])
            data["mmtuning"] = block
        else:
            apply_set(data, item)
    return data


def split_config(data: dict[str, Any], where: str = "the YAML") -> Job:
    """Separate and validate the `mmtuning:` block; refuse LLaMA-Factory keys that conflict with it."""
    if "mmtuning" not in data:
        raise MMTuningError(f"{where} has no `mmtuning:` block; add one (e.g. `mmtuning: {{vision: {{layers: "
                            f"{{top: 4}}}}}}`) or run plain `llamafactory-cli train` instead.")
    args = dict(data)
    block = with_keep_dataset(args.pop("mmtuning"), args)
    session = MMTuning.for_host(block, args, LLAMAFACTORY, source=where, quant_bits=loaded_bits(args),
                                problems=quantization_method_conflict(args, block))
    session.log = log_line
    replaced = replaced_targets(args, LLAMAFACTORY)
    for key in LLAMAFACTORY.targets:
        args.pop(key, None)  # LLaMA-Factory's target expansion never runs: the plan wraps the model
    problems = [f"`{key}` (write {instead})" for key, instead in OWNED_KEYS.items() if key in args]
    problems += [f"`{key}` ({instead})" for key, instead in BYPASS_KEYS.items() if args.get(key)]
    problems += [f"`{key}` (it replaces the optimizer, so mmtuning's per-modality parameter groups could not "
                 f"apply; remove it)" for key in CUSTOM_OPTIMIZER_KEYS if args.get(key) not in (None, False)]
    if problems:
        raise MMTuningError(f"{where}: these LLaMA-Factory keys conflict with the `mmtuning:` block, which decides "
                            f"the adapters: " + "; ".join(problems) + ".")
    finetuning = args.setdefault("finetuning_type", "lora")
    if finetuning not in FINETUNING_TYPES:
        raise MMTuningError(f"{where}: finetuning_type: {finetuning} cannot carry mmtuning adapters; write "
                            f"finetuning_type: lora (mmtuning.method picks the adapter method: lora, ia3, loha, lokr, adapter, moe-lora or a plugin's).")
    stage = args.get("stage", "sft")
    if stage not in TRAINER_BY_STAGE:
        raise MMTuningError(f"{where}: stage: {stage} is not supported with an `mmtuning:` block yet; supported "
                            f"stages: {', '.join(TRAINER_BY_STAGE)}.")
    if session.needs_probe() and stage != "sft":
        reader = "`layers: auto` probes" if not session.config.inits_from_data() else \
            f"init: {session.config.inits_from_data()[0]} reads"
        raise MMTuningError(f"{where}: {reader} the run's first training batches, which mmtuning reads in stage: sft "
                            f"only; train with stage: sft, or write the layers yourself (e.g. {{top: 4}}) and use an "
                            f"init that needs no data (pissa, milora, olora).")
    check_fsdp(fsdp_request_from(args), session.config, where)
    check_deepspeed(zero_stage(args.get("deepspeed")), session.config, where)
    if session.keep is not None and stage != "sft":
        raise MMTuningError(f"{where}: mmtuning.keep needs stage: sft (keep prompts are written by the run's chat "
                            f"template, which stage: {stage} does not use); remove `keep:` or train with stage: sft.")
    return Job(args, session, stage, replaced)


def loaded_bits(args: dict[str, Any]) -> int | None:
    """The bits LLaMA-Factory quantizes to on the fly (`quantization_bit`), None for a 16-bit model."""
    bits = args.get("quantization_bit")
    return int(bits) if bits not in (None, "", False) else None


def quantization_method_conflict(args: dict[str, Any], block: Any) -> list[str]:
    """`quant:` shapes a bitsandbytes quantization; LLaMA-Factory's other on-the-fly methods (hqq, eetq) have none."""
    method = args.get("quantization_method", "bnb")
    if isinstance(block, dict) and block.get("quant") is not None and method not in ("bnb", "bitsandbytes", None):
        return [f"`quantization_method: {method}` (mmtuning.quant writes a bitsandbytes config; write "
                f"`quantization_method: bnb`, or remove `quant:`)"]
    return []


def log_line(line: str) -> None:
    sys.stderr.write(f"[mmtuning] {line}\n")


def require_llamafactory():
    """Import llamafactory lazily: the core environment does not have it."""
    try:
        import llamafactory
    except ImportError as error:
        raise MMTuningError(
            f"`mmtune llamafactory` needs LLaMA-Factory {SUPPORTED_VERSION} in this Python environment "
            f"({sys.executable}): {error}. Install it (`pip install llamafactory=={SUPPORTED_VERSION}` with "
            f"torch/torchvision/torchaudio built for each other), or run scripts/env.sh's llamafactory_venv."
        ) from None
    return llamafactory


def check_host_args(args: dict[str, Any], where: str = "the YAML") -> tuple:
    """LLaMA-Factory's own parser on the args: unknown keys and bad values fail here, before any model loads."""
    require_llamafactory()
    from llamafactory.hparams import get_train_args

    try:
        return get_train_args(dict(args))
    except (ValueError, SystemExit) as error:
        raise MMTuningError(f"{where}: LLaMA-Factory refused its settings: {error}") from None


# --- the patches --------------------------------------------------------------------------------------


@contextlib.contextmanager
def replaced(module_name: str, name: str, replacement: Any) -> Iterator[Any]:
    """Bind `module.name` to `replacement` and restore the original afterwards."""
    import importlib

    module = importlib.import_module(module_name)
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield original
    finally:
        setattr(module, name, original)


def wrap_with_plan(session: MMTuning, run: dict[str, Any] | None = None) -> Callable:
    """Replacement for `get_peft_model(model, peft_config)`: wrap with mmtuning's plan, keep the task type. Under
    `layers: auto` the probe runs first on the run's first training batches (`run`: what get_dataset saw)."""

    def get_peft_model(model, peft_config, *args: Any, **kwargs: Any):
        task_type = getattr(peft_config, "task_type", None)
        probe = (probe_batches(run, model), run["training_args"].seed) if run else (None, 0)
        session.after_load(model, *probe)  # under `layers: auto` the probe picks the layers here
        wrapped = session.wrap(model, **({"task_type": task_type} if task_type else {}))
        if session.require_plan().probe is not None:
            session.log(f"layers: auto, probed on {session.plan.probe.batches} batch(es): "
                        f"{session.plan.probe.describe()} (scores: mmtuning_report.json, peft.probe)")
        return wrapped

    return get_peft_model


def recording_dataset(original: Callable, run: dict[str, Any]) -> Callable:
    """Replacement for the sft workflow's `get_dataset`: the same dataset module, its arguments recorded in `run`."""
    import inspect

    def get_dataset(*args: Any, **kwargs: Any):
        module = original(*args, **kwargs)
        run.update(inspect.signature(original).bind(*args, **kwargs).arguments, dataset=module.get("train_dataset"))
        return module

    return get_dataset


def probe_batches(run: dict[str, Any], model: Any):
    """The first training batches, collated by the sft workflow's collator class with the workflow's arguments."""
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.train.sft import workflow

    from .hf import first_batches

    if run.get("dataset") is None:
        return None  # the plan then says that `layers: auto` got no data, and what to give
    model_args, data_args, training_args = run["model_args"], run["data_args"], run["training_args"]
    tokenizer_module = {"tokenizer": run["tokenizer"], "processor": run.get("processor")}
    collator = workflow.SFTDataCollatorWith4DAttentionMask(
        template=run["template"], model=model, pad_to_multiple_of=8,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else run["tokenizer"].pad_token_id,
        block_diag_attn=model_args.block_diag_attn, neat_packing=data_args.neat_packing,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype, **tokenizer_module)
    return first_batches(run["dataset"], collator, training_args.per_device_train_batch_size)


def add_quantization_policy(session: MMTuning, original: Callable) -> Callable:
    """Replacement for `configure_quantization`: LLaMA-Factory's config plus mmtuning's skip list."""

    def configure_quantization(config, tokenizer, model_args, is_trainable, init_kwargs):
        original(config, tokenizer, model_args, is_trainable, init_kwargs)
        policy = session.bnb_config_kwargs(config)
        if policy is None:
            return
        from transformers import BitsAndBytesConfig

        built = init_kwargs.get("quantization_config")
        if not isinstance(built, BitsAndBytesConfig):
            raise MMTuningError("mmtuning's quantization settings need on-the-fly bitsandbytes quantization: "
                                "add `quantization_bit: 4` (quantization_method: bnb) to the YAML, or remove "
                                "mmtuning's quantization settings.")
        for key, value in policy.items():
            setattr(built, key, as_dtype_like(getattr(built, key, None), value))
        built.post_init()

    return configure_quantization


def as_dtype_like(current: Any, value: Any) -> Any:
    """Policy kwargs name dtypes as strings ("bfloat16"); an already-built config holds torch dtypes."""
    import torch

    if isinstance(current, torch.dtype) and isinstance(value, str):
        return getattr(torch, value)
    return value


def trainer_with_mmtuning(session: MMTuning, base: type) -> type:
    """`base` (LLaMA-Factory's trainer class) with mmtuning's optimizer groups, extra losses and keep rows written
    under the run's template."""
    from .hf import MMTuningTrainerMixin

    return type(f"MMTuning{base.__name__}", (KeepUnderRunTemplate, MMTuningTrainerMixin, base), {"mmtuning": session})


# --- keep: the run's template writes the keep prompts; keep.data may name a dataset ---------------------


class KeepUnderRunTemplate:
    """Before `MMTuningTrainerMixin.train` builds the keep rows: hand over the run's own template object and
    processor, which LLaMA-Factory keeps in the data collator (the trainer's processing_class is the tokenizer).
    The keep report is logged under LLaMA-Factory's logger, whose handler shows INFO lines."""

    def train(self, *args: Any, **kwargs: Any):
        session = self.mmtuning
        if session.keep is not None:
            collator = self.data_collator
            template = getattr(collator, "template", None)
            if template is None:
                raise MMTuningError("mmtuning.keep: this LLaMA-Factory stage's collator holds no template, so keep "
                                    "prompts cannot be written the way the run is trained; use stage: sft, or remove "
                                    "`keep:`.")
            processor = getattr(collator, "processor", None)
            session.use_keep_template(processor=processor if processor is not None else collator.tokenizer,
                                      render=template_render(template, collator.tokenizer, processor,
                                                             session.keep.sources.has_images),
                                      log=logging.getLogger("llamafactory.mmtuning").info)
        return super().train(*args, **kwargs)


def template_render(template: Any, tokenizer: Any, processor: Any, with_images: bool) -> Callable:
    """Keep prompts through LLaMA-Factory's own template: its mm plugin writes one image token per image (the
    core widens it to the image's run, as the plugin does for training rows) and the template encodes the user
    turn with its prefix and default system prompt. Returns `render(messages) -> text`; tokenizing that text
    gives the template's ids (special tokens the tokenizer adds by itself are not written twice)."""
    import dataclasses

    from llamafactory.data.mm_plugin import BasePlugin
    from llamafactory.extras.constants import IMAGE_PLACEHOLDER

    plugin = template.mm_plugin
    if with_images:
        if plugin.image_token is None:
            raise MMTuningError("mmtuning.keep: the keep prompts carry images but this run's `template:` has no image "
                                "token (its mm_plugin is text-only); use the model's multimodal template (e.g. "
                                "template: llava / qwen2_vl) or write `keep.images: none`.")
        if type(plugin).process_token_ids is not BasePlugin.process_token_ids:
            raise MMTuningError(f"mmtuning.keep: the `{type(plugin).__name__}` of this template inserts image tokens "
                                f"into the token ids itself, which keep rows cannot reproduce; write `keep.images: "
                                f"none` (text-only keep prompts) or remove `keep:`.")
    plugin = dataclasses.replace(plugin, expand_mm_tokens=False)
    added = list(tokenizer("", add_special_tokens=True)["input_ids"])

    def render(messages: list[dict[str, Any]]) -> str:
        parts = messages[0]["content"]
        images = sum(part.get("type") == "image" for part in parts)
        text = "".join(IMAGE_PLACEHOLDER if part.get("type") == "image" else part.get("text", "") for part in parts)
        turn = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        turn = plugin.process_messages(turn, [None] * images, [], [], processor)
        ids, _ = template.encode_oneturn(tokenizer, turn)
        if added and ids[: len(added)] == added:
            ids = ids[len(added):]
        return tokenizer.decode(ids, skip_special_tokens=False)

    return render


KEEP_DATA_SUFFIXES = (".json", ".jsonl")


def with_keep_dataset(block: Any, args: dict[str, Any]) -> Any:
    """`keep.data` naming a dataset of `dataset_info.json` (in `dataset_dir`): its user turns and images, read
    with LLaMA-Factory's own column/tag mapping and media_dir rule, written as a keep-data JSONL in a temporary
    folder that the block then names. A path to a file is left as it is; the user's files are only read."""
    keep = block.get("keep") if isinstance(block, dict) else None
    name = keep.get("data") if isinstance(keep, dict) else None
    if not isinstance(name, str) or Path(name).is_file():
        return block
    dataset_dir = str(args.get("dataset_dir", "data"))
    info_path = Path(dataset_dir) / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return block  # no dataset_info.json: the core says the file is missing and what to write
    if not isinstance(info, dict) or name not in info:
        listed = ", ".join(sorted(info)[:8]) if isinstance(info, dict) else ""
        raise MMTuningError(f"mmtuning.keep.data: '{name}' is neither a file nor a dataset of {info_path} (it lists: "
                            f"{listed or 'nothing'}); write a dataset name from it or the path of a JSONL file.")
    require_llamafactory()
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list

    attr = get_dataset_list([name], dataset_dir)[0]
    source = Path(dataset_dir) / attr.dataset_name
    if attr.load_from != "file" or source.suffix.lower() not in KEEP_DATA_SUFFIXES or not source.is_file():
        raise MMTuningError(f"mmtuning.keep.data: the dataset '{name}' is read from {attr.load_from} "
                            f"'{attr.dataset_name}', and keep data is read only from a local "
                            f"{'/'.join(KEEP_DATA_SUFFIXES)} file_name; point `file_name` at one, or write the path "
                            f"of a JSONL file.")
    if attr.formatting not in ("sharegpt", "openai", "alpaca"):
        raise MMTuningError(f"mmtuning.keep.data: the dataset '{name}' has formatting {attr.formatting}; keep data "
                            f"reads sharegpt, openai or alpaca datasets.")
    media = get_dataset_converter(attr.formatting, attr, SimpleNamespace(media_dir=args.get("media_dir") or dataset_dir))
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if source.suffix.lower() == ".jsonl" else json.loads(source.read_text(encoding="utf-8"))
    rows = [keep_row(record, attr, media, name, number) for number, record in enumerate(records, 1)]
    folder = Path(tempfile.mkdtemp(prefix="mmtuning-keep-"))
    atexit.register(shutil.rmtree, folder, True)
    target = folder / f"{name}.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {**block, "keep": {**keep, "data": str(target)}}


def keep_row(record: Any, attr: Any, media: Any, name: str, number: int) -> dict[str, Any]:
    """One dataset record as a keep-data row: the first user turn (or alpaca's instruction + input) and images."""
    if not isinstance(record, dict):
        raise MMTuningError(f"mmtuning.keep.data: record {number} of dataset '{name}' is not a JSON object.")
    if attr.formatting == "alpaca":
        text = "\n".join(str(record[c]) for c in (attr.prompt, attr.query) if c and record.get(c))
    else:
        turns = record.get(attr.messages) or []
        text = next((t.get(attr.content_tag) for t in turns
                     if isinstance(t, dict) and t.get(attr.role_tag) == attr.user_tag), None)
    if not isinstance(text, str) or not text.strip():
        raise MMTuningError(f"mmtuning.keep.data: record {number} of dataset '{name}' has no user turn (role "
                            f"'{attr.user_tag}' in `{attr.messages}`); keep data needs the user's question.")
    images = media._find_medias(record.get(attr.images)) if attr.images else None
    return {"messages": [{"role": "user", "content": text}], "images": [str(Path(p).absolute()) for p in images or []]}


@contextlib.contextmanager
def patched(session: MMTuning, stage: str) -> Iterator[None]:
    """All of mmtuning's replacements inside LLaMA-Factory, active for one `run_exp`."""
    import importlib

    with contextlib.ExitStack() as stack:
        run: dict[str, Any] | None = None
        if session.needs_probe():
            run, data = {}, PATCHES["probe data"]
            original = getattr(importlib.import_module(data.module), data.name)
            stack.enter_context(replaced(data.module, data.name, recording_dataset(original, run)))
        targets = PATCHES["targets"]
        stack.enter_context(replaced(targets.module, targets.name, wrap_with_plan(session, run)))
        quant = PATCHES["quantization"]
        original = getattr(importlib.import_module(quant.module), quant.name)
        stack.enter_context(replaced(quant.module, quant.name, add_quantization_policy(session, original)))
        module, name = TRAINER_BY_STAGE[stage]
        base = getattr(importlib.import_module(module), name)
        stack.enter_context(replaced(module, name, trainer_with_mmtuning(session, base)))
        yield


# --- running ------------------------------------------------------------------------------------------


def device_count() -> int:
    """Devices the way LLaMA-Factory counts them (CUDA, XPU, NPU, MPS)."""
    from llamafactory.extras.misc import get_device_count

    return get_device_count()


def wants_torchrun(env: dict[str, str], devices: int) -> bool:
    """LLaMA-Factory's rule: FORCE_TORCHRUN, or more than one device (unless Ray); never inside a rank."""
    if "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return False
    enabled = {"true", "1", "y"}
    if env.get("FORCE_TORCHRUN", "").lower() in enabled:
        return True
    return devices > 1 and env.get("USE_RAY", "").lower() not in enabled


def torchrun_command(config: Path, overrides: list[str], env: dict[str, str], devices: int,
                     python: str = sys.executable, port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m mmtuning_plugin.integrations.llamafactory CONFIG overrides`.

    Every rank runs this module on the same YAML, so every rank applies the same plan and patches.
    NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT mean what they mean for llamafactory-cli.
    """
    if port is None and "MASTER_PORT" not in env:
        from llamafactory.extras.misc import find_available_port

        port = find_available_port()
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", env.get("NNODES", "1"),
        "--node_rank", env.get("NODE_RANK", "0"),
        "--nproc_per_node", env.get("NPROC_PER_NODE", str(max(devices, 1))),
        "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port", env.get("MASTER_PORT", str(port)),
        "-m", __name__, str(Path(config).absolute()), *overrides,
    ]


def plan_ahead(job: Job):
    """Plan on a meta-device skeleton when the model's config is already on disk, so a layer range or module
    name that does not exist fails in seconds, before weights load. Otherwise the plan is checked after loading."""
    from transformers import AutoConfig

    from ..loading import build_skeleton
    from ..probe import plan_unprobed

    try:
        model_config = AutoConfig.from_pretrained(str(job.args.get("model_name_or_path")), local_files_only=True,
                                                  trust_remote_code=bool(job.args.get("trust_remote_code")))
        skeleton = build_skeleton(model_config)
    except Exception:  # not downloaded yet, or not buildable from its config: LLaMA-Factory loads it first
        return None
    return plan_unprobed(skeleton, job.session.config)  # `layers: auto` layers are probed once data exists


def announce(job: Job, plan) -> None:
    """The startup lines: the effective r/alpha per modality, and the YAML's target keys the plan replaced."""
    sys.stderr.write(f"[mmtuning] effective LoRA settings: {effective_settings(job.session.config)}\n")
    if job.replaced_targets:
        message = (targets_warning(job.replaced_targets, plan, LLAMAFACTORY.host) if plan is not None else
                   f"{'; '.join(job.replaced_targets)}: replaced by the mmtuning plan (checked once the model loads)")
        sys.stderr.write(f"[mmtuning] warning: {message}\n")


def prepare(config: Path, overrides: list[str]) -> Job:
    """Everything that can fail on bad input, before any model loads."""
    data = read_config(config, overrides)
    job = split_config(data, where=str(config))
    check_host_args(job.args, where=str(config))
    announce(job, plan_ahead(job))
    return job


def run_in_process(job: Job) -> None:
    from llamafactory.train.tuner import run_exp

    callbacks = job.session.callbacks()
    with patched(job.session, job.stage):
        run_exp(dict(job.args), callbacks=callbacks)


def train(config: Path, overrides: list[str]) -> int:
    """`mmtune llamafactory train`: validate, then run here or once per device under torchrun."""
    job = prepare(config, overrides)
    if wants_torchrun(dict(os.environ), device_count()):
        command = torchrun_command(config, overrides, dict(os.environ), device_count())
        return subprocess.run(command, check=False).returncode
    run_in_process(job)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of each torchrun rank (and of `python -m mmtuning_plugin.integrations.llamafactory`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write("usage: python -m mmtuning_plugin.integrations.llamafactory CONFIG.yaml [key=value ...]\n")
        sys.exit(2)
    try:
        code = train(Path(argv[0]), argv[1:])
    except MMTuningError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_together(code)
    sys.exit(code)


def leave_together(code: int) -> None:
    """How a rank of a multi-process run ends once training has saved everything: all ranks meet, then the process
    exits without the interpreter's teardown. Over gloo (CPU processes) a rank whose C++ destructors meet gloo's
    still-joinable threads aborts (SIGABRT, "terminate called without an active exception"), failing a run that
    succeeded."""
    import logging

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
