"""The `inspect-targets` report drawn as rich tables (the JSON itself is built by report.py)."""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console

from .config import layer_span
from .console import Table, console, human, human_bytes

KIND_LABELS = {"attention": "attn", "projector": "linear", "patch_embed": "patch", "embed_tokens": "embed", "lm_head": "head"}


def _layers_text(selected: Optional[list[int]], total: int) -> str:
    if total == 0:
        return "-"
    if selected is None:
        return f"0 of {total}"
    return f"{layer_span(selected)} of {total}"


def print_report(report: dict[str, Any], out: Optional[Console] = None) -> None:
    out = out or console
    table = Table(title=f"{report['model']} ({report['model_type']}, map: {report['map_source']})", title_justify="left")
    for column in ("modality", "layers", "kinds", "modules", "params", "r/alpha", "trainable"):
        table.add_column(column, justify="right" if column in ("modules", "params", "trainable") else "left")
    for modality, row in report["modalities"].items():
        on, selective = row["enabled"], row.get("selective")
        table.add_row(
            modality if on else f"[dim]{modality}[/]",
            _layers_text(row["selected_layers"], row["layers"]) if on else _layers_text(None, row["layers"]),
            (selective["method"] if selective else ",".join(KIND_LABELS.get(k, k) for k in row["kinds"])) or "-",
            f"{len(selective['modules'])} whole" if selective else
            f"{len(row['targeted'])}/{max(len(row['modules']), len(row['targeted']))}",
            human(row["params"]),
            f"{row['r']}/{row['alpha']:g}" + (f" {row['init']}" if row.get("init", "lora") != "lora" else "")
            if on and not selective else
            "-" if on else "absent" if row.get("absent") else "off",
            human(row["trainable_params"]) if on else "0",
        )
    plan = report["plan"]
    table.add_section()
    table.add_row("total", "", plan["method"], str(len(plan["target_modules"]) + len(plan["target_parameters"])),
                  human(sum(r["params"] for r in report["modalities"].values())), "", human(plan["trainable_params"]))
    out.print(table)
    if plan.get("method_options"):
        options = ", ".join(f"{key} {', '.join(map(str, value)) if isinstance(value, list) else value}"
                            for key, value in plan["method_options"].items())
        out.print(f"method {plan['method']}: {options}", highlight=False)
    if plan["target_parameters"]:
        out.print(f"bare parameters adapted through target_parameters: {', '.join(plan['target_parameters'])}")
    print_training_memory(report["modalities"], out, table="quant" not in report or _any_selective(report))
    selected = {m for row in report["modalities"].values() for m in (row.get("selective") or {}).get("modules", [])}
    whole = [m for m in plan["modules_to_save"] if m not in selected]
    if whole:
        out.print(f"trained whole (modules_to_save): {', '.join(whole)}")
    if "quant" in report:
        print_quant(report["quant"])
    if "sharding" in report:
        print_sharding(report["sharding"])
    if "probe" in plan:
        print_probe(plan["probe"], out)
        if "probe_note" in report:
            out.print(f"note: {report['probe_note']}", highlight=False)
    print_schedule(report["schedule"])


def print_probe(probe: dict[str, Any], out: Console) -> None:
    """Each probed layer's share of task and of general importance, their ratio, and the chosen ones."""
    table = Table(title=f"layers: auto - probe on {probe['batches']} batch(es), {probe['answer_tokens']} answer tokens "
                        f"(general: {probe['general']})", title_justify="left")
    for column in ("modality", "layer", "task %", "general %", "score", "adapter params", "chosen"):
        table.add_column(column, justify="left" if column in ("modality", "chosen") else "right")
    for modality, row in probe["modalities"].items():
        for index, layer in enumerate(row["layers"]):
            label = modality if index == 0 else f"[dim]{row['limit']}[/]" if index == 1 else ""
            table.add_row(label, str(layer["layer"]),
                          f"{100 * layer['task']:.1f}", f"{100 * layer['general']:.1f}", f"{layer['score']:.3f}",
                          human(layer["params"]), "yes" if layer["chosen"] else "")
        table.add_section()
    out.print(table)
    out.print("score = task share / general share; above 1 the task leans on the layer more than the model's current "
              "answers do. Chosen: " + "; ".join(f"{m} {layer_span(r['chosen'])}" for m, r in probe["modalities"].items()),
              highlight=False)


def _any_selective(report: dict[str, Any]) -> bool:
    return any(row.get("selective") for row in report["modalities"].values())


def print_training_memory(modalities: dict[str, Any], out: Console, table: bool = True) -> None:
    """What training adds per modality: trainable tensors (fp32 value + gradient), Adam's two fp32 states, and
    what a selective method adds (copied-but-frozen tensors, SPIDER's mask state); then one line per method.
    `table=False` (the quant table already shows trainable and optimizer bytes): the lines only."""
    rows = {m: r for m, r in modalities.items() if r["enabled"]}
    if table:
        _training_memory_table(rows, out)
    for modality, row in rows.items():
        if row.get("selective"):
            print_selective(modality, row["selective"], out)


def _training_memory_table(rows: dict[str, Any], out: Console) -> None:
    table = Table(title="training memory (Adam: 2 fp32 states each)", title_justify="left")
    for column in ("modality", "trainable", "bytes", "optimizer", "extra"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for modality, row in rows.items():
        extra = _extra_bytes(row.get("selective"))
        table.add_row(modality, human(row["trainable_params"]), _bytes(row["trainable_bytes"]),
                      _bytes(row["optimizer_state_bytes"]), _extra_text(extra))
    table.add_section()
    table.add_row("total", human(_sum(r["trainable_params"] for r in rows.values())),
                  *(_bytes(_sum(r[key] for r in rows.values())) for key in ("trainable_bytes", "optimizer_state_bytes")),
                  _extra_text(sum(_extra_bytes(r.get("selective")) for r in rows.values())))
    out.print(table)


def _extra_text(value: int) -> str:
    return human_bytes(value) if value else "-"


def _extra_bytes(selective: Optional[dict[str, Any]], dtype_bytes: int = 2) -> int:
    """A selective method's memory beyond trainable and optimizer bytes: the copy's frozen tensors (16-bit)
    and SPIDER's state."""
    if not selective:
        return 0
    return selective["frozen_copy_params"] * dtype_bytes + selective.get("extra_state_bytes", 0)


def print_selective(modality: str, row: dict[str, Any], out: Console) -> None:
    """One line per selective modality: what trains, the copy's untrained share, SPIDER's mask and state."""
    line = (f"{modality}: selective {row['method']} on {len(row['modules'])} modules (modules_to_save), "
            f"{human(row['trained_params'])} trained")
    if row["frozen_copy_params"]:
        line += f", {human(row['frozen_copy_params'])} more copied but frozen"
    if row["method"] == "spider":
        line += (f"; mask ratio <= {row['mask_ratio']:g} per step, mask state {human_bytes(row['extra_state_bytes'])} "
                 f"(fp32 |grad| sums + step snapshot)")
    out.print(line, highlight=False)


def _bytes(value: Optional[int]) -> str:
    return "?" if value is None else human_bytes(value)


def _sum(values) -> Optional[int]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def print_quant(quant: dict[str, Any]) -> None:
    """Memory after quantization per modality (weights incl. 4-bit constants; adapters + AdamW state in fp32)."""
    table = Table(title=f"memory under quant: {quant['policy']}", title_justify="left")
    for column in ("modality", "precision", "4b/16b", "weights", "trainable", "Adam", "total"):
        table.add_column(column, justify="left" if column in ("modality", "precision") else "right")
    for modality, row in quant["modalities"].items():
        table.add_row(modality, quant["precisions"][modality], f"{row['quantized_modules']}/{row['kept_16bit_modules']}",
                      human_bytes(row["weight_bytes"]), human(row["trainable_params"]),
                      human_bytes(row["optimizer_state_bytes"]), human_bytes(row["total_bytes"]))
    total = quant["total"]
    table.add_section()
    table.add_row("total", "", "", human_bytes(total["weight_bytes"]), human(total["trainable_params"]),
                  human_bytes(total["optimizer_state_bytes"]), human_bytes(total["total_bytes"]))
    console.print(table)
    console.print(f"llm_int8_skip_modules: {', '.join(quant['skip_modules'])}")


def print_sharding(sharding: dict[str, Any]) -> None:
    """Model-state memory per rank under FSDP2 next to one process."""
    n = sharding["world_size"]
    table = Table(title=f"FSDP2 over {n} process{'es' if n > 1 else ''}: model state per rank", title_justify="left")
    for column in ("", "bytes"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("one process", human_bytes(sharding["one_process_bytes"]))
    table.add_row(f"1/{n} of it", human_bytes(sharding["sharded_state_bytes"]))
    table.add_row("gathered at peak (root unit, 2 largest blocks)", human_bytes(sharding["gathered_at_peak_bytes"]))
    table.add_section()
    table.add_row("per rank", human_bytes(sharding["per_rank_bytes"]))
    console.print(table)
    console.print(f"{sharding['units']} units; largest block {sharding['largest_unit']} "
                  f"({human_bytes(sharding['largest_unit_bytes'])}); {sharding['note']}", highlight=False)


def print_schedule(schedule: dict[str, Any]) -> None:
    """Which layers train from which step (only when some modality has a schedule)."""
    if schedule["static"]:
        return
    if schedule["timeline"] is not None:
        rows = schedule["timeline"]
        modalities = [key for key in rows[0] if key != "step"] if rows else []
        table = Table("from step", *modalities, title="schedule (layers training from that step on)", title_justify="left")
        for row in rows:
            table.add_row(str(row["step"]), *(row[m] for m in modalities))
    else:
        table = Table("modality", "from", "layers", title="schedule (pass --steps N to resolve fractions into steps)",
                      title_justify="left")
        for modality, stages in schedule["stages"].items():
            for stage in stages:
                table.add_row(modality, stage["at"], stage["layers"])
    console.print(table)
