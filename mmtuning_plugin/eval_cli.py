"""`mmtune eval`: E/F/O of an adapter on the user's own target and general sets (mmtuning_plugin/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .console import Table
from .errors import MMTuningError


def eval_command(
    adapter: Path = typer.Argument(..., help="A saved PEFT adapter directory (adapter_config.json inside)."),
    target: Path = typer.Option(..., "--target", help="JSONL of the new task: {\"image\", \"question\", \"answer\"} per line."),
    general: Path = typer.Option(..., "--general", help="JSONL of what the model knew before (same format)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model directory (default: the adapter's base_model_name_or_path)."),
    match: str = typer.Option("normalised", "--match", help="exact, or normalised (case, punctuation, articles ignored)."),
    four_bit: bool = typer.Option(False, "--four-bit/--no-four-bit", help="Load the base in 4-bit NF4, as in QLoRA training."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Longest generated answer."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per generation batch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with every answer) instead of tables."),
) -> None:
    """Accuracy before (base, adapter off) and after (adapter) on a target and a general set: E = target gain,
    F = general change (negative = forgetting), O = E + F. Greedy generation, exact or normalised match."""
    from .console import console, fail

    try:
        if match not in ("exact", "normalised"):
            raise MMTuningError(f"--match {match}: write exact or normalised.")
        from .evaluate import load_adapter_model, read_items, score_sets

        sets = {"target": read_items(target, "target"), "general": read_items(general, "general")}
        model, processor, base_name = load_adapter_model(adapter, base, four_bit)
        report = _with_progress(lambda tick: score_sets(model, processor, sets, match, max_new_tokens, batch_size, tick),
                                2 * sum(len(v) for v in sets.values()), quiet=as_json)
    except MMTuningError as error:
        fail(str(error))
    report = {"adapter": str(adapter), "base": base_name, **report}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_eval(report, console)


def _with_progress(work, total: int, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .console import errors

    if quiet:
        return work(None)
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=errors, transient=True) as progress:
        task = progress.add_task("eval", total=total)
        return work(lambda n: progress.advance(task, n))


def print_eval(report: dict[str, Any], console) -> None:
    table = Table(title=f"{report['adapter']} on {report['base']} ({report['match']} match)", title_justify="left")
    for column in ("set", "items", "before %", "after %", "change"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, row in report["sets"].items():
        table.add_row(name, str(row["items"]), f"{100 * row['before']:.1f}", f"{100 * row['after']:.1f}",
                      f"{100 * (row['after'] - row['before']):+.1f}")
    console.print(table)
    kinds = Table(title="per question type (accuracy %, before -> after)", title_justify="left")
    for column in ("set", "type", "before -> after"):
        kinds.add_column(column, justify="right" if column == "before -> after" else "left")
    for name, row in report["sets"].items():
        for kind, before in row["before_by_type"].items():
            kinds.add_row(name, kind, f"{100 * before:.1f} -> {100 * row['after_by_type'][kind]:.1f}")
    console.print(kinds)
    console.print(f"E {report['E']:+.1f}  F {report['F']:+.1f}  O [bold]{report['O']:+.1f}[/]  (E = target gain, "
                  f"F = general change, negative = forgetting; accuracy points)")
