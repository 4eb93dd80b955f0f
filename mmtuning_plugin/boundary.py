"""The command boundary: every `mmtune` command runs inside `CommandBoundary`, so an error from anywhere below
(file system, torch, safetensors, a bug) leaves as one paragraph and exit code 2. The translation itself is
the table in errors.py; this module only wires it into typer."""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from .console import fail
from .errors import user_message


def _click_exits() -> tuple[type, ...]:
    """Click's own exits and usage errors (typer >= 0.16 vendors click as typer._click): they pass through."""
    classes: list[type] = [typer.Exit]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        classes += [getattr(module, n) for n in ("ClickException", "Exit", "Abort") if hasattr(module, n)]
    return tuple(classes)


class CommandBoundary(TyperGroup):
    """Every command runs inside this group: any error from below (file system, torch, safetensors, a bug)
    leaves as one paragraph and exit code 2, translated by errors.user_message in one place."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _click_exits():
            raise
        except Exception as error:
            message = user_message(error)
            if message is None:
                raise
            fail(message)
