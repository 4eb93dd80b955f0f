"""The reports mmtuning writes, as JSON: `inspect-targets` (a plan on a model skeleton) and the run report
`mmtuning_report.json` that every host writes into its output directory (the last phase of the host contract,
session.PHASES). Both describe a plan with the same per-modality rows (`plan_modalities`); report_tables.py
draws the first as tables.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from .arch import MODALITIES

from .config import layer_span
from .errors import MMTuningError

REPORT_FILE = "mmtuning_report.json"
REPORT_VERSION = 1
# Distributions whose versions decide what a run did; the host's own one is added by name (HostKeys.distribution).
VERSIONED = ("mmtuning", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


def plan_modalities(plan: Any) -> dict[str, dict[str, Any]]:
    """Per modality: what the plan adapts (exact names), its layers, kinds, rank, alpha, trainable size and the bytes
    training adds, and what a selective method trains instead of adapters (None without one)."""
    rows = {}
    for modality in MODALITIES:
        planned = plan.modules_of(modality)
        targeted = [m.name for m in planned] + [p.name for p in plan.parameters_of(modality)]
        rows[modality] = {
            "enabled": plan.config.spec(modality).enabled and modality not in plan.absent,
            "absent": modality in plan.absent,  # the model has no such part; the defaults skip it
            "selected_layers": plan.layers.get(modality),
            "kinds": sorted({m.leaf.kind for m in planned}),
            "targeted": targeted,
            "targets": len(targeted),
            "targeted_params": sum(m.leaf.params for m in planned),
            "r": plan.config.rank(modality),
            "alpha": plan.config.scale_alpha(modality),
            "init": plan.config.init_of(modality),
            "trainable_params": plan.trainable_params(modality),
            **training_bytes(plan.trainable_params(modality)),
            "selective": selective_row(plan, modality),
        }
    return rows


def inspect_report(model_name: str, model, config: dict[str, Any], steps: Optional[int] = None,
                   probe_batches: Any = None, seed: int = 0, world_size: Optional[int] = None) -> dict[str, Any]:
    """The JSON report of `inspect-targets` (also what the table is drawn from); with `probe_batches` the
    `layers: auto` probe picks the layers and its scores are in `plan.probe`."""
    from .probe import plan_with_probe
    from .schedules import schedule_plan

    plan = plan_with_probe(model, config, probe_batches, seed)
    layout = plan.layout
    modalities = {}
    for modality, row in plan_modalities(plan).items():
        modalities[modality] = {
            "layers": layout.layer_counts[modality],
            "usable_layers": layout.usable_layers[modality],
            "modules": [leaf.name for leaf in layout.leaves_of(modality) if leaf.kind in ("attention", "mlp", "other", "projector")],
            "params": layout.params[modality],
            **{key: value for key, value in row.items() if key != "targets"},
        }
    report = {
        "model": model_name,
        "model_type": plan.model_type,
        "map_source": layout.modality_map.source,
        "modalities": modalities,
        "plan": plan.summary(),
        "schedule": schedule_plan(plan).report(steps),
    }
    if plan.config.quant is not None:
        from .quant import memory_estimate

        report["quant"] = memory_estimate(model, plan.config.quant, plan)
    if world_size is not None:
        from .sharding import per_rank_memory

        report["sharding"] = per_rank_memory(model, plan, world_size)
    return report


def training_bytes(trainable: Optional[int]) -> dict[str, Optional[int]]:
    """Bytes of the trainable tensors (fp32 value and gradient) and of Adam's two fp32 states, per parameter."""
    from .quant.memory import ADAM_STATE_BYTES, TRAINABLE_BYTES

    known = trainable is not None
    return {"trainable_bytes": trainable * TRAINABLE_BYTES if known else None,
            "optimizer_state_bytes": trainable * ADAM_STATE_BYTES if known else None}


def selective_row(plan, modality: str) -> Optional[dict[str, Any]]:
    """A selective modality's method, modules, trained tensors and extra memory: the modules_to_save copy's
    untrained tensors and, for spider, its accumulator and step snapshot."""
    from .selective.spider import extra_state_bytes

    selected = plan.selected_of(modality)
    if not selected:
        return None
    spec = plan.config.spec(modality).selective
    trained = sum(s.trained_params for s in selected)
    row = {"method": spec.method, "modules": [s.name for s in selected], "trained_params": trained,
           "frozen_copy_params": sum(s.module_params for s in selected) - trained}
    if spec.method == "spider":
        row.update(mask_ratio=spec.ratio, extra_state_bytes=extra_state_bytes(trained))
    return row


def probe_report(model_name: str, config: dict[str, Any], data, batch_size: int, seed: int,
                 steps: Optional[int] = None, spinner: Any = None) -> dict[str, Any]:
    """`inspect-targets MODEL --probe DATA`: the model's weights, the probe on DATA's items as training batches
    (inside `spinner`, the CLI's progress display, when given)."""
    from .config import load_config
    from .evaluate import item_batches, load_model_and_processor, read_items

    items = read_items(data, "probe")
    config, implied = probe_config(config)
    load_config(config)  # bad settings fail before the weights load
    model, processor = load_model_and_processor(model_name, "--probe")
    with spinner if spinner is not None else contextlib.nullcontext():
        report = inspect_report(model_name, model, config, steps, item_batches(items, processor, batch_size), seed)
    if implied:
        report["probe_note"] = (f"no `layers: auto` in the spec, so --probe scored {implied}.layers as `auto` (the top "
                                f"half); write `{implied}.layers: {{auto: {{top_k: N}}}}` or `{{auto: {{budget: 2M}}}}` to "
                                f"set the limit.")
    return report


def probe_config(config: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
    """The spec for `--probe`: as given when a modality has `layers: auto`; otherwise language.layers becomes auto
    (when the spec leaves language's layers to their default), so `--probe DATA` alone shows the scores."""
    from .config import load_config
    from .probe import auto_modalities

    parsed = load_config(config)
    if auto_modalities(parsed):
        return config, None
    language = parsed.language
    if not language.enabled or "layers" in language.model_fields_set:
        raise MMTuningError("--probe scores the layers of a modality with `layers: auto`, and this spec has none; "
                            "write e.g. --set language.layers=auto (or {auto: {top_k: 4}}), or drop --probe.")
    block = config.get("language")
    block = dict(block) if isinstance(block, dict) else {}
    return {**config, "language": {**block, "layers": "auto"}}, "language"


# --- the run report: mmtuning_report.json ------------------------------------------------------------------


def run_report(session: Any, model: Any, optimizer: Any = None, *, step: int = 0, total_steps: Optional[int] = None,
               finished: bool = False) -> dict[str, Any]:
    """What one run trains, the same for every host: the plan per modality, how the model was quantized and
    whether that was verified, the schedule, the losses, keep, the optimizer's groups, the library versions."""
    from .schedules import schedule_plan

    plan = session.require_plan()
    config = session.config
    return {
        "version": REPORT_VERSION,
        "host": session.host.name,
        "status": "finished" if finished else "training",
        "step": step,
        "phases": list(session.phases),
        "plan": {
            "model_type": plan.model_type,
            "method": config.method,
            "dropout": plan.dropout,
            "use_dora": config.use_dora,
            "use_rslora": config.use_rslora,
            "modalities": plan_modalities(plan),
            "modules_to_save": plan.modules_to_save,
            "trainable_params": plan.trainable_params(),
        },
        "peft": plan.summary(),
        "quantization": quantization_section(session, model),
        "schedule": schedule_plan(plan).report(total_steps),
        "losses": {name: options.model_dump() for name, options in config.losses.items()},
        "keep": keep_section(session),
        "sharding": getattr(session, "sharding", None),
        "optimizer_groups": optimizer_groups(model, optimizer),
        "base_layer_types": base_layer_types(plan, model),
        "versions": versions(session.host.distribution),
    }


def quantization_section(session: Any, model: Any) -> dict[str, Any]:
    """Per modality how many Linear modules are 4-bit / 8-bit / 16-bit, the `quant:` policy, and whether the
    model was checked against it (the `loaded` phase)."""
    from .quant import quantization_report

    policy = session.config.quant
    counts = {m: {kind: len(names) for kind, names in row.items()} for m, row in quantization_report(model).items()}
    return {"policy": None if policy is None else (policy.preset or "custom"),
            "precisions": None if policy is None else policy.precisions(),
            "verified": session.quant_verified, "modalities": counts}


def keep_section(session: Any) -> Optional[dict[str, Any]]:
    """The keep settings and, once its rows are built, what it keeps (prompts, rows, base answers); None without keep."""
    if session.keep is None:
        return None
    return {"settings": session.config.keep.model_dump(), "prepared": session.keep.prepared,
            **({"summary": session.keep.report} if session.keep.report else {})}


def optimizer_groups(model: Any, optimizer: Any) -> list[dict[str, Any]]:
    """Each optimizer group: its name (modality), learning rate, weight decay and the parameters it holds."""
    if optimizer is None:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"name": group.get("name"), "lr": group.get("lr"), "weight_decay": group.get("weight_decay"),
             "tensors": len(group["params"]), "params": sum(p.numel() for p in group["params"]),
             "parameters": [names.get(id(p), "?") for p in group["params"]]}
            for group in optimizer.param_groups]


def base_layer_types(plan: Any, model: Any) -> dict[str, str]:
    """The class under each adapted module (`Linear4bit`, `Linear`): what PEFT wrapped after loading."""
    from .names import PEFT_PREFIX

    modules = dict(model.named_modules())
    types = {}
    for planned in plan.modules:
        module = modules.get(PEFT_PREFIX + planned.name) or modules.get(planned.name)
        if module is not None:
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            types[planned.name] = type(base).__name__
    return types


def versions(host_distribution: Optional[str] = None) -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found: dict[str, Optional[str]] = {}
    for name in (*VERSIONED, *([host_distribution] if host_distribution else [])):
        if name == "mmtuning":
            found[name] = __version__
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_report(output_dir: Any, report: dict[str, Any]) -> Path:
    """`output_dir/mmtuning_report.json`, written to a temporary sibling and renamed: a reader never sees half a
    file, and a failed write leaves the previous report."""
    path = Path(output_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def summary_line(report: dict[str, Any], path: Path) -> str:
    """One log line: what got adapters per modality, and the optimizer's groups."""
    parts = []
    for modality, row in report["plan"]["modalities"].items():
        selective = row["selective"]
        count = row["targets"] + (len(selective["modules"]) if selective else 0)
        if count:
            layers = row["selected_layers"]  # probed layers need not be contiguous: layer_span writes gaps
            where = f" in layers {layer_span(layers)}" if layers and len(layers) > 1 else (
                f" in layer {layers[0]}" if layers else "")
            how = f"selective {selective['method']}" if selective else f"r={row['r']}"
            parts.append(f"{modality} {count}{where} ({how})")
    groups = ", ".join(f"{g['name']} {g['params']:,}" for g in report["optimizer_groups"])
    return f"plan verified: {'; '.join(parts)}. Optimizer groups (params): {groups}. Report: {path}"
