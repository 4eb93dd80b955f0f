"""The reports mmtuning writes, as JSON: `inspect-targets` (a plan on a model skeleton) and the run report
`mmtuning_report.json` that every host writes into its output directory (the last phase of the host contract,
session.PHASES). Both describe a plan with the same per-modality rows (`plan_modalities`); report_tables.py
draws the first as tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .arch import MODALITIES

REPORT_FILE = "mmtuning_report.json"
REPORT_VERSION = 1
# Distributions whose versions decide what a run did; the host's own one is added by name (HostKeys.distribution).
VERSIONED = ("mmtuning", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


def plan_modalities(plan: Any) -> dict[str, dict[str, Any]]:
    """Per modality: what the plan adapts (exact names), its layers, kinds, rank, alpha and trainable size."""
    rows = {}
    for modality in MODALITIES:
        planned = plan.modules_of(modality)
        targeted = [m.name for m in planned] + [p.name for p in plan.parameters_of(modality)]
        rows[modality] = {
            "enabled": plan.config.spec(modality).enabled,
            "selected_layers": plan.layers.get(modality),
            "kinds": sorted({m.leaf.kind for m in planned}),
            "targeted": targeted,
            "targets": len(targeted),
            "targeted_params": sum(m.leaf.params for m in planned),
            "r": plan.config.rank(modality),
            "alpha": plan.config.scale_alpha(modality),
            "trainable_params": plan.trainable_params(modality),
        }
    return rows


def inspect_report(model_name: str, model, config: dict[str, Any], steps: Optional[int] = None) -> dict[str, Any]:
    """The JSON report of `inspect-targets` (also what the table is drawn from)."""
    from .schedules import schedule_plan
    from .targets import plan_targets

    plan = plan_targets(model, config)
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
    return report


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
        if row["targets"]:
            layers = row["selected_layers"]
            where = f" in layers {layers[0]}-{layers[-1]}" if layers and len(layers) > 1 else (
                f" in layer {layers[0]}" if layers else "")
            parts.append(f"{modality} {row['targets']}{where} (r={row['r']})")
    groups = ", ".join(f"{g['name']} {g['params']:,}" for g in report["optimizer_groups"])
    return f"plan verified: {'; '.join(parts)}. Optimizer groups (params): {groups}. Report: {path}"
