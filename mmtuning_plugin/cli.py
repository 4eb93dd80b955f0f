"""`mmtune`: the command line. Commands are plain typed functions; every one has `--json` for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MMTuningError

app = typer.Typer(
    name="mmtune",
    help="Modality-aware PEFT for vision-language models: see which modules get adapters, convert adapters, run the demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    """One paragraph on stderr, exit code 2: the contract for every user error."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def read_spec(spec: Optional[Path], sets: list[str]) -> dict[str, Any]:
    """The `mmtuning:` block from a YAML file (the block itself or a host YAML holding it) plus --set edits."""
    import yaml

    data: dict[str, Any] = {}
    if spec is not None:
        try:
            loaded = yaml.safe_load(spec.read_text())
        except FileNotFoundError:
            raise MMTuningError(f"--spec {spec}: no such file.") from None
        except yaml.YAMLError as error:
            raise MMTuningError(f"--spec {spec} is not valid YAML: {error}") from None
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise MMTuningError(f"--spec {spec}: expected a mapping (an `mmtuning:` block), got {type(loaded).__name__}.")
        data = loaded.get("mmtuning", loaded) or {}
    for item in sets:
        apply_set(data, item)
    return data


def apply_set(data: dict[str, Any], item: str) -> None:
    """`--set vision.layers=top:8` edits the block; the value is read as YAML (numbers, lists, true/false)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise MMTuningError(f"--set {item!r}: write KEY=VALUE, e.g. --set vision.modules=attention --set vision.r=8")
    value = yaml.safe_load(raw) if raw.strip() else None
    *parents, leaf = key.strip().split(".")
    target = data
    for part in parents:
        current = target.get(part)
        if current is None or isinstance(current, bool):
            current = {} if current is None or current else {"enabled": False}
            target[part] = current
        if not isinstance(current, dict):
            raise MMTuningError(f"--set {item!r}: '{part}' is {current!r}, not a block of settings.")
        target = current
    target[leaf] = value


KIND_LABELS = {"attention": "attn", "projector": "linear", "patch_embed": "patch", "embed_tokens": "embed", "lm_head": "head"}


def human(value: Optional[int]) -> str:
    """12345678 -> 12.3M: tables stay readable at 80 columns; --json keeps exact integers."""
    if value is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def _layers_text(selected: Optional[list[int]], total: int) -> str:
    if total == 0:
        return "-"
    if selected is None:
        return f"0 of {total}"
    if selected == list(range(selected[0], selected[-1] + 1)):
        span = f"{selected[0]}-{selected[-1]}" if len(selected) > 1 else str(selected[0])
    else:
        span = ",".join(map(str, selected))
    return f"{span} of {total}"


def inspect_report(model_name: str, model, config: dict[str, Any], steps: Optional[int] = None) -> dict[str, Any]:
    """The JSON report of `inspect-targets` (also what the table is drawn from)."""
    from .arch import MODALITIES
    from .schedule import schedule_plan
    from .targets import plan_targets

    plan = plan_targets(model, config)
    layout = plan.layout
    modalities = {}
    for modality in MODALITIES:
        planned = plan.modules_of(modality)
        modalities[modality] = {
            "layers": layout.layer_counts[modality],
            "usable_layers": layout.usable_layers[modality],
            "modules": [leaf.name for leaf in layout.leaves_of(modality) if leaf.kind in ("attention", "mlp", "other", "projector")],
            "params": layout.params[modality],
            "enabled": plan.config.spec(modality).enabled,
            "selected_layers": plan.layers.get(modality),
            "kinds": sorted({m.leaf.kind for m in planned}),
            "targeted": [m.name for m in planned] + [p.name for p in plan.parameters_of(modality)],
            "targeted_params": sum(m.leaf.params for m in planned),
            "r": plan.config.rank(modality),
            "alpha": plan.config.scale_alpha(modality),
            "trainable_params": plan.trainable_params(modality),
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


def print_report(report: dict[str, Any], out: Optional[Console] = None) -> None:
    out = out or console
    table = Table(title=f"{report['model']} ({report['model_type']}, map: {report['map_source']})", title_justify="left")
    for column in ("modality", "layers", "kinds", "modules", "params", "r/alpha", "trainable"):
        table.add_column(column, justify="right" if column in ("modules", "params", "trainable") else "left")
    for modality, row in report["modalities"].items():
        on = row["enabled"]
        table.add_row(
            modality if on else f"[dim]{modality} (off)[/]",
            _layers_text(row["selected_layers"], row["layers"]) if on else _layers_text(None, row["layers"]),
            ",".join(KIND_LABELS.get(k, k) for k in row["kinds"]) or "-",
            f"{len(row['targeted'])}/{max(len(row['modules']), len(row['targeted']))}",
            human(row["params"]),
            f"{row['r']}/{row['alpha']:g}" if on else "-",
            human(row["trainable_params"]) if on else "0",
        )
    plan = report["plan"]
    table.add_section()
    table.add_row("total", "", plan["method"], str(len(plan["target_modules"]) + len(plan["target_parameters"])),
                  human(sum(r["params"] for r in report["modalities"].values())), "", human(plan["trainable_params"]))
    out.print(table)
    if plan["target_parameters"]:
        out.print(f"bare parameters adapted through target_parameters: {', '.join(plan['target_parameters'])}")
    if plan["modules_to_save"]:
        out.print(f"trained whole (modules_to_save): {', '.join(plan['modules_to_save'])}")
    if "quant" in report:
        print_quant(report["quant"])
    print_schedule(report["schedule"])



def print_quant(quant: dict[str, Any]) -> None:
    """Memory after quantization per modality (weights incl. 4-bit constants; adapters + AdamW state in fp32)."""
    table = Table(title=f"memory under quant: {quant['policy']}", title_justify="left")
    for column in ("modality", "precision", "4bit/16bit", "weights", "trainable", "optimizer", "total"):
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


def human_bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"



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


@app.command("inspect-targets")
def inspect_targets(
    model: str = typer.Argument(..., help="Model directory with config.json, a hub id in the local cache, or a model type (qwen2_5_vl)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="YAML with an `mmtuning:` block (or an Axolotl/LLaMA-Factory YAML holding one)."),
    sets: list[str] = typer.Option([], "--set", help="Edit the spec: --set vision.modules=attention --set vision.layers=top:8 --set projector=false"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantization policy (all-4bit, balanced, language-4bit, none): adds memory per modality."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total training steps, to show a schedule's fractions as steps."),
) -> None:
    """Show which modules of each modality get adapters, with layer ranges and parameter counts."""
    from .loading import load_skeleton

    try:
        config = read_spec(spec, sets)
        if quant is not None:
            config["quant"] = quant
        report = inspect_report(model, load_skeleton(model), config, steps)
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


@app.command("demo")
def demo(
    steps: int = typer.Option(400, "--steps", min=1, help="Training steps per arm (tests use a short run)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training stream and adapter init (eval items are fixed)."),
    out: Path = typer.Option(Path("mmtune-demo"), "--out", help="Directory for adapters, results.json and curves.png."),
    four_bit: bool = typer.Option(True, "--four-bit/--no-four-bit", help="Load the base model in 4-bit NF4 (QLoRA)."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for torch."),
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

    settings = DemoSettings(steps=steps, seed=seed, out=out, four_bit=four_bit, threads=threads)
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


from .convert.cli import convert_app  # noqa: E402  (after fail/console: the sub-app uses them)

app.add_typer(convert_app, name="convert")
from .integrations.llamafactory_cli import app as llamafactory_app  # noqa: E402  (imports no llamafactory)

app.add_typer(llamafactory_app, name="llamafactory")
from .eval_cli import eval_command  # noqa: E402

app.command("eval")(eval_command)


def main() -> None:
    import warnings

    # PEFT 0.21's PeftModel.__init__ reads a property transformers 5.23 deprecated: noise for every user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        app()
    except MMTuningError as error:  # a command that forgot to catch still gets the contract
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
