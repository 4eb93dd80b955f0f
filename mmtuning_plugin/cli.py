"""`mmtune`: the command line. Commands are plain typed functions; every one has `--json` for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .boundary import CommandBoundary
from .console import Table, console, errors, fail
from .convert.cli import convert_app
from .errors import MMTuningError, user_message
from .eval_cli import eval_command
from .integrations.llamafactory_cli import app as llamafactory_app
from .report import inspect_report, probe_report
from .report_tables import print_report
from .spec_input import read_spec

app = typer.Typer(
    name="mmtune",
    help="Modality-aware PEFT for vision-language models: see which modules get adapters, convert adapters, run the demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CommandBoundary,
)


def quant_option(preset: str, spec_quant: Any) -> Any:
    """`--quant P` joined with the spec's `quant:`: a block gets P as its preset; two different presets are refused."""
    if spec_quant is None or spec_quant == preset:
        return preset
    if isinstance(spec_quant, dict) and spec_quant.get("preset") in (None, preset):
        return {**spec_quant, "preset": preset}
    given = spec_quant.get("preset") if isinstance(spec_quant, dict) else spec_quant
    raise MMTuningError(f"--quant {preset} contradicts quant preset {given!r} from --spec/--set; give the preset "
                        f"once (drop --quant, or drop quant.preset / quant: from the spec).")


@app.command("inspect-targets")
def inspect_targets(
    model: str = typer.Argument(..., help="Model directory with config.json, a hub id in the local cache, or a model type (qwen2_5_vl)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="YAML with an `mmtuning:` block (or an Axolotl/LLaMA-Factory YAML holding one)."),
    sets: list[str] = typer.Option([], "--set", help="Edit the spec: --set vision.modules=attention --set vision.layers=top:8 --set projector=false"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantization policy (all-4bit, balanced, language-4bit, none): adds memory per modality."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total training steps, to show a schedule's fractions as steps."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="JSONL of task items ({\"image\", \"question\", \"answer\"} per line, as `mmtune eval` reads): run the `layers: auto` probe on them (MODEL must be a model directory with weights) and show each layer's scores. Without `layers: auto` in the spec, language.layers becomes auto."),
    probe_batch_size: int = typer.Option(4, "--probe-batch-size", min=1, help="Items per probe batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the probe's forwards."),
    world_size: Optional[int] = typer.Option(None, "--world-size", min=1, help="Processes sharing the model under FSDP2: adds model-state memory per rank next to one process (activations not counted)."),
) -> None:
    """Show which modules of each modality get adapters, with layer ranges and parameter counts."""
    from .loading import load_skeleton

    try:
        config = read_spec(spec, sets)
        if quant is not None:
            config["quant"] = quant_option(quant, config.get("quant"))
        if probe is None:
            report = inspect_report(model, load_skeleton(model), config, steps, world_size=world_size)
        else:
            spinner = None if as_json else errors.status(f"probing layers on {probe}", spinner="dots")
            report = probe_report(model, config, probe, probe_batch_size, seed, steps, spinner)
    except MMTuningError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)


@app.command("architectures")
def architectures(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the model types with a registered modality map (built-in or from plugins)."""
    from .arch import registered_maps

    maps = registered_maps()
    rows = [{"model_type": t, "vision": list(m.vision), "projector": list(m.projector), "language": list(m.language),
             "source": m.source} for t, m in sorted(maps.items())]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model type", "vision", "projector", "language", "source")
    for row in rows:
        table.add_row(row["model_type"], ", ".join(row["vision"]), ", ".join(row["projector"]),
                      ", ".join(row["language"]), row["source"])
    console.print(table)


@app.command("plugins")
def plugins_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the loaded plugins (built-ins included): their hooks, what each registered, and any name a later
    plugin took over from an earlier one."""
    from .plugins import REGISTRIES, overrides, plugins_report

    try:
        report = {"plugins": plugins_report(), "overrides": [o for kind in REGISTRIES for o in overrides(kind)],
                  "hooks": [{"hook": r.hook, "kind": r.kind, "signature": r.signature} for r in REGISTRIES.values()]}
    except MMTuningError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table("plugin", "hook", "registered", title="mmtuning plugins (a later plugin wins a shared name)",
                  title_justify="left")
    table.columns[0].no_wrap = table.columns[1].no_wrap = True
    kinds = {r.hook: r.kind for r in REGISTRIES.values()}
    for plugin in report["plugins"]:
        label = plugin["name"] + (" [dim](built-in)[/]" if plugin["builtin"] else f" [dim]({plugin['module']})[/]")
        for index, hook in enumerate(plugin["hooks"] or ["-"]):
            names = plugin["registered"].get(kinds.get(hook, ""), [])
            table.add_row(label if index == 0 else "", hook, ", ".join(names) or "-")
    console.print(table)
    for item in report["overrides"]:
        console.print(f"{item['kind']} '{item['name']}': {item['plugin']} overrides {item['overrode']}", highlight=False)
    for hook in report["hooks"]:
        console.print(f"{hook['hook']}: {hook['signature']}", highlight=False)


@app.command("demo")
def demo(
    steps: Optional[int] = typer.Option(None, "--steps", min=1, show_default=False,
                                        help="Training steps per arm (default: the demo's own; tests use a short run)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training stream and adapter init (eval items are fixed)."),
    out: Path = typer.Option(Path("mmtune-demo"), "--out", help="Directory for adapters, results.json and curves.png."),
    four_bit: bool = typer.Option(True, "--four-bit/--no-four-bit", help="Load the base model in 4-bit NF4 (QLoRA)."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for torch, per arm."),
    jobs: int = typer.Option(0, "--jobs", min=0, help="Arms trained at once, one process each (0: one per CPU core, "
                                                       "up to the number of arms; 1: one after the other)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object (no tables, no progress)."),
) -> None:
    """Fine-tune the embedded tiny VLM on a new task twice (plain LoRA vs. mmtuning's recipe) and score
    target gain E, general-skill change F and O = E + F on held-out items."""
    try:
        from .demo.report import DemoConsole
        from .demo.runner import DemoSettings, run_demo
    except ImportError as error:
        fail(f"mmtune demo needs pillow, tokenizers and matplotlib ({error}); install them with "
             f"pip install 'mmtuning-plugin[demo]'.")

    settings = DemoSettings(**({"steps": steps} if steps is not None else {}), seed=seed, out=out, four_bit=four_bit, threads=threads,
                            jobs=jobs)
    view = None if as_json else DemoConsole(console, settings)
    try:
        if view:
            view.intro()
        report = run_demo(settings, on_event=view.event if view else None)
    except MMTuningError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        view.summary(report)


app.add_typer(convert_app, name="convert")
app.add_typer(llamafactory_app, name="llamafactory")  # imports no llamafactory until a command runs
app.command("eval")(eval_command)


def main() -> None:
    import warnings

    # PEFT 0.21's PeftModel.__init__ reads a property transformers 5.23 deprecated: noise for every user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        app()
    except Exception as error:  # outside any command (e.g. while importing one): the same contract
        message = user_message(error)
        if message is None:
            raise
        errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
