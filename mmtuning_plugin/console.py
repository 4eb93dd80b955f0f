"""The terminal: one console for output, one for errors, the `fail` contract, and number formatting.

Every command and view module prints through these (the CLI, `mmtune convert`, the demo, host sub-commands)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table as RichTable

console = Console()
errors = Console(stderr=True)


class Table(RichTable):
    """Every table mmtuning prints: at 80 columns a cell folds onto a second line instead of being cut with
    '...' (rich's default drops the end of a number: `96.9 ->` without its value)."""

    def add_column(self, *args, **kwargs) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)


def fail(message: str) -> None:
    """One paragraph on stderr, exit code 2: the contract for every user error."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def human(value: Optional[int]) -> str:
    """12345678 -> 12.3M: tables stay readable at 80 columns; --json keeps exact integers."""
    if value is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def human_bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"
