"""`mmtune convert ...`: each subcommand calls one function of mmtuning_plugin.convert; `--json` prints its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

convert_app = typer.Typer(
    help="Convert LoRA adapters: remap layouts across transformers versions, merge, resize, tailor, split, combine, export for serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

FROM = typer.Option(None, "--from", help="Layout of the input: <=4.51, 4.52-4.57 or 5.x (detected when omitted).")
FORCE = typer.Option(False, "--force", help="Replace an existing --out directory.")
JSON = typer.Option(False, "--json", help="Print one JSON summary instead of text.")
BASE = typer.Option(None, "--base", help="Base model (directory, cached hub id or model type) to verify against; "
                                         "default: the adapter's base_model_name_or_path.")


def _run(action: Callable[[], dict[str, Any]], as_json: bool, show: Callable[[dict[str, Any]], None]) -> None:
    from ..console import fail
    from ..errors import MMTuningError

    try:
        summary = action()
    except MMTuningError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        show(summary)


def _say(text: str) -> None:
    from ..console import console
    console.print(text, highlight=False, soft_wrap=True)


def _show_remap(s: dict[str, Any]) -> None:
    (old, new), = s["example"].items()
    _say(f"remapped {s['modules']} modules ({s['renamed_modules']} renamed) of {s['model_type']} from {s['from']} to "
         f"{s['to']}, verified against {s['verified_against']}\n  e.g. {old} -> {new}\nwrote {s['out']}")
    for note in s["notes"]:
        _say(f"  note: {note}")


def _show_merge(s: dict[str, Any]) -> None:
    extra = f", {s['dequantized_4bit_weights']} weights through the 4-bit round trip" if s["four_bit"] else ""
    _say(f"merged {s['merged_modules']} modules into {s['shards']} shards ({s['bytes_written'] / 1e6:.1f} MB, dtype "
         f"{s['dtype']}{extra})\nwrote {s['out']}")


def _show_tailor(s: dict[str, Any]) -> None:
    from ..console import Table, console

    how = f"by {s['by']}" + (", compensated" if s["compensated"] else "")
    table = Table(title=f"tailor ({how})", title_justify="left")
    for column in ("modality", "share", "kept entries", "of"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for modality, row in s["modalities"].items():
        table.add_row(modality, f"{row['share']:g}", f"{row['kept']:,}", f"{row['entries']:,}")
    console.print(table)
    if "total_output_relative_error" in s:
        _say(f"relative error of the modules' outputs on --calib {s['total_output_relative_error']:.4f}")
    _say(f"relative error of the kept delta {s['total_relative_error']:.4f}\nwrote {s['out']} from {s['adapter']} "
         f"(score it: mmtune eval {s['out']} --target ... --general ...)")


def _show_errors(s: dict[str, Any], key: str, error_key: str, title: str) -> None:
    from ..console import Table, console

    table = Table(title=title, title_justify="left")
    for column in ("module", "rank", "relative error"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in s["modules"]:
        rank = f"{row['rank_from']} -> {row['rank_to']}" if "rank_from" in row else str(row["rank"])
        table.add_row(row["module"], rank, f"{row[error_key]:.4f}")
    console.print(table)
    _say(f"total relative error {s[key]:.4f}\nwrote {s['out']}")


@convert_app.command("remap")
def remap_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    source: Optional[str] = FROM,
    target: str = typer.Option("5.x", "--to", help="Layout to write: <=4.51, 4.52-4.57 or 5.x."),
    base: Optional[str] = BASE,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Rename adapter tensors and adapter_config.json between transformers layouts, verified against the base."""
    from .remap import remap

    _run(lambda: remap(adapter, out, source, target, base, force), as_json, _show_remap)


@convert_app.command("merge")
def merge_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory."),
    base: Path = typer.Option(..., "--base", help="Base model directory with safetensors weights."),
    out: Path = typer.Option(..., "--out", help="Output model directory (written atomically)."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (keep), bf16, fp16, fp32."),
    dequantize_4bit: Optional[str] = typer.Option(
        None, "--dequantize-4bit", help="QLoRA adapters: merge into the 4-bit round-tripped weights the adapter was "
                                        "trained against (nf4 or fp4) instead of the original 16-bit ones."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="bnb_4bit_use_double_quant used in training."),
    blocksize: int = typer.Option(64, "--blocksize", help="4-bit block size used in training (bitsandbytes default 64)."),
    skip_4bit: list[str] = typer.Option(["lm_head"], "--skip-4bit", help="Modules left in 16-bit in training "
                                                                        "(llm_int8_skip_modules); repeatable."),
    device: str = typer.Option("cpu", "--device", help="Where the additions run (cpu, cuda); shards stream through the CPU."),
    source: Optional[str] = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Merge the adapter into the base weights, one safetensors shard in memory at a time."""
    from ..errors import MMTuningError
    from .merge import FourBit, merge

    def action():
        four_bit = None
        if dequantize_4bit is not None:
            four_bit = FourBit(dequantize_4bit, blocksize, double_quant, tuple(skip_4bit))
        elif blocksize != 64 or not double_quant or list(skip_4bit) != ["lm_head"]:
            raise MMTuningError("--blocksize/--no-double-quant/--skip-4bit describe the 4-bit round trip and only apply with "
                                "--dequantize-4bit nf4|fp4; add it, or drop them.")
        return merge(adapter, base, out, dtype, four_bit, force, source, device=device)

    _run(action, as_json, _show_merge)


@convert_app.command("resize")
def resize_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory."),
    rank: Optional[int] = typer.Option(None, "--rank", help="New rank for every module (capped at the current rank)."),
    per_modality: Optional[str] = typer.Option(None, "--per-modality", help="Ranks per modality, e.g. vision=4,language=16."),
    base: Optional[str] = BASE,
    source: Optional[str] = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Change ranks by truncated SVD of each B@A; report the relative error per module and in total."""
    from .resize import resize

    _run(lambda: resize(adapter, out, rank, per_modality, base, source, force), as_json,
         lambda s: _show_errors(s, "total_relative_error", "relative_error", f"resize {s['adapter']}"))


@convert_app.command("tailor")
def tailor_command(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter directory."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory (a sparse delta)."),
    keep: Optional[float] = typer.Option(None, "--keep", help="Share of each module's delta entries to keep (the "
                                         "most salient, see --by), e.g. 0.1."),
    per_modality: Optional[str] = typer.Option(None, "--per-modality", help="Shares per modality, e.g. "
                                               "vision=0.05,language=0.1 (others: --keep, or whole)."),
    by: Optional[str] = typer.Option(None, "--by", help="Salience: magnitude (no data), activation (delta^2 x "
                                     "input second moment on --calib) or fisher (delta^2 x the weight's empirical "
                                     "Fisher on --calib's answers, one backward per item); default activation with --calib."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Eval JSONL of the new task (image, question, answer): "
                                         "the modules' inputs for --by activation|fisher and --compensate."),
    compensate: bool = typer.Option(False, "--compensate", help="Refit the kept entries per output row so the "
                                    "module's output on --calib stays closest to the full delta's."),
    base: Optional[str] = BASE,
    source: Optional[str] = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Keep the largest share of each module's LoRA delta and write it exactly as a sparse adapter (Model Tailor's
    posterior selection); score before and after with `mmtune eval`."""
    from .tailor import tailor

    _run(lambda: tailor(adapter, out, keep, per_modality, by, calib, compensate, base, source, force), as_json,
         _show_tailor)


@convert_app.command("split")
def split_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory."),
    keep: str = typer.Option(..., "--keep", help="Modalities to keep: language, vision, projector (comma list)."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory."),
    merge_rest_into: Optional[Path] = typer.Option(None, "--merge-rest-into", help="Base model directory: the dropped "
                                                   "modalities' deltas are merged into a copy at OUT/merged_base."),
    base: Optional[str] = BASE,
    source: Optional[str] = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Keep only some modalities' adapter modules (e.g. language for engines without vision LoRA)."""
    from .split import split

    def show(s):
        _say(f"kept {s['kept_modules']} modules ({', '.join(s['keep'])}), dropped {s['dropped_modules']} "
             f"({', '.join(s['dropped_modalities']) or '-'})\nwrote {s['out']}")
        if s["merged_base"]:
            _say(f"dropped deltas merged into {s['merged_base']}")
        elif s["lost_without_merge"]:
            _say(f"note: the dropped modules' deltas are not in the output; use --merge-rest-into BASE to keep them")

    _run(lambda: split(adapter, out, keep, merge_rest_into, base, source, force), as_json, show)


@convert_app.command("combine")
def combine_command(
    adapters: list[Path] = typer.Argument(..., help="Two or more PEFT adapter directories of the same base."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory."),
    method: str = typer.Option("linear", "--method", help="linear, ties, dare_linear or dare_ties."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per adapter, comma separated (default 1 each)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of the result (linear: SVD-truncate the concatenation; "
                                                            "others: default the largest input rank)."),
    density: float = typer.Option(0.5, "--density", help="ties/dare: fraction of each delta kept."),
    seed: int = typer.Option(0, "--seed", help="dare: seed of the random drop."),
    base: Optional[str] = BASE,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Task-arithmetic merge of adapters (different ranks by concatenation or SVD)."""
    from ..errors import MMTuningError
    from .combine import combine

    def action():
        try:
            values = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise MMTuningError(f"--weights {weights!r}: write numbers separated by commas, e.g. --weights 0.7,0.3.") from None
        return combine(adapters, out, method, values, rank, density, seed, base, force)

    _run(action, as_json, lambda s: _show_errors(s, "total_svd_relative_error", "svd_relative_error",
                                                 f"combine ({s['method']}, weights {s['weights']})"))


def _show_export(s: dict[str, Any]) -> None:
    merged = (f"merged {s['merged_modules']} modules ({', '.join(s['merged_modalities']) or '-'})"
              + (f" and {s['replaced_tensors']} modules_to_save tensors" if s["replaced_tensors"] else ""))
    if s["for"] == "transformers":
        _say(f"{merged} into {s['shards']} shards ({s['bytes_written'] / 1e6:.1f} MB, dtype {s['dtype']})\n"
             f"processor files: {', '.join(s['processor_files']) or 'none'}\nwrote {s['out']}")
    else:
        if s["base_out"]:
            _say(f"base copy: {merged}, processor files: {', '.join(s['processor_files']) or 'none'}\n  wrote {s['base_out']}")
        if s["adapter_out"]:
            padded = f", {len(s['padded_modules'])} padded to an allowed rank" if s["padded_modules"] else ""
            _say(f"adapter: {s['adapter_modules']} LoRA modules ({', '.join(s['adapter_modalities'])}), rank "
                 f"{', '.join(map(str, s['ranks']))}{padded}, no modules_to_save\n  wrote {s['adapter_out']}")
        _say(f"serve with: {s['serve']}")
    for note in s["notes"]:
        _say(f"note: {note}")


@convert_app.command("export")
def export_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory."),
    target: str = typer.Option(..., "--for", help="vllm: an LM-only adapter plus a base copy with the vision tower "
                                                 "and projector deltas merged; transformers: one merged model."),
    base: Path = typer.Option(..., "--base", help="Base model directory with safetensors weights (and its processor files)."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    tower_lora: bool = typer.Option(False, "--tower-lora", help="vllm: keep the vision and projector LoRA in the "
                                                               "adapter too, for vLLM's --enable-tower-connector-lora."),
    pad_ranks: bool = typer.Option(False, "--pad-ranks", help="vllm: pad ranks vLLM refuses (e.g. 4) with zeros up to "
                                                             "the next rank it serves (8); exact."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype of the merged weights: auto (keep), bf16, fp16, fp32."),
    source: Optional[str] = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Write what vLLM serves (LM-only adapter + merged base copy) or one merged transformers model."""
    from .export import export

    _run(lambda: export(adapter, base, out, target, tower_lora, pad_ranks, dtype, force, source), as_json, _show_export)
