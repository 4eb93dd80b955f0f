"""`mmtune llamafactory ...`: the Typer sub-app. Imports LLaMA-Factory only when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import MMTuningError

app = typer.Typer(name="llamafactory", help="Train with LLaMA-Factory 0.9.5 using an `mmtuning:` block in its YAML.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("train")
def train(
    config: Path = typer.Argument(..., help="A LLaMA-Factory training YAML with an `mmtuning:` block."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="key=value edits, as for llamafactory-cli: max_steps=10 or mmtuning.vision.r=8."),
) -> None:
    """Run LLaMA-Factory's run_exp with mmtuning's targets, quantization skip list, optimizer groups and losses.

    With more than one device (or FORCE_TORCHRUN=1) it launches one process per device with torchrun."""
    from ..console import fail
    from .llamafactory import train as run_train

    try:
        code = run_train(config, list(overrides or []))
    except MMTuningError as error:
        fail(str(error))
    raise typer.Exit(code=code)
