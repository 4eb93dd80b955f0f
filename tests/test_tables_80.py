"""Every table mmtuning prints fits an 80-column terminal: no line wider than 80 and no cell cut with '…'.

The commands run in-process with the package's console at width 80 (what `COLUMNS=80` gives a terminal); the demo
and eval views are drawn from reports of the shape they print."""

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmtuning_plugin import console as console_module
from mmtuning_plugin.cli import app

WIDTH = 80
runner = CliRunner()


def assert_fits(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)
    assert "…" not in text, text


@pytest.fixture
def at_80_columns(monkeypatch):
    monkeypatch.setattr(console_module.console, "_width", WIDTH)
    monkeypatch.setattr(console_module.errors, "_width", WIDTH)


@pytest.mark.parametrize("args", [
    ["inspect-targets", "llava", "--set", "quant=balanced", "--set", "vision.modules=attention"],
    ["inspect-targets", "qwen2_5_vl", "--set", "vision.layers=top:4", "--set", "vision.schedule=top_down"],
    ["inspect-targets", "llava", "--set", "language.selective=spider", "--set", "projector.full=true"],
    ["inspect-targets", "blip"],  # no projector: reported as absent
    ["architectures"],
    ["plugins"],
], ids=lambda args: "-".join(a for a in args if not a.startswith("-"))[:60])
def test_cli_tables_fit(at_80_columns, args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_fits(result.output)


def recorded(draw) -> str:
    out = Console(record=True, width=WIDTH)
    draw(out)
    return out.export_text()


def arm(label, before, after, by_before, by_after):
    return {"label": label, "trainable_params": 1_234_567, "E": 100 * (after["target"] - before["target"]),
            "F": 100 * (after["general"] - before["general"]), "O": 0.0, "adapter": f"mmtune-demo/{label}",
            "before": {**before, "by_question": by_before}, "after": {**after, "by_question": by_after}}


def test_demo_tables_fit(tmp_path):
    from mmtuning_plugin.demo.report import DemoConsole
    from mmtuning_plugin.demo.runner import DemoSettings

    kinds = {"position": 0.0, "colour": 0.969, "shape": 0.969}
    report = {"seed": 0, "seconds": 91.0, "plot": str(tmp_path / "curves.png"), "eval": {"general_items": 64},
              "arms": {"plain_lora": arm("plain LoRA", {"target": 0.0, "general": 0.969},
                                         {"target": 1.0, "general": 0.0}, kinds, {**kinds, "colour": 0.0}),
                       "mmtuning": arm("mmtuning", {"target": 0.0, "general": 0.969},
                                       {"target": 1.0, "general": 0.953}, kinds, kinds)}}
    settings = DemoSettings(seed=0, out=tmp_path)
    assert_fits(recorded(lambda out: DemoConsole(out, settings).intro()))
    assert_fits(recorded(lambda out: DemoConsole(out, settings).summary(report)))


def test_eval_tables_fit():
    from mmtuning_plugin.eval_cli import print_eval

    row = {"items": 64, "before": 0.969, "after": 0.953, "before_by_type": {"colour": 0.969, "shape": 0.969},
           "after_by_type": {"colour": 0.938, "shape": 0.969}}
    report = {"adapter": "runs/a-rather-long-output-directory/checkpoint-500", "base": "models/my-base-model",
              "match": "exact", "sets": {"target": row, "general": row}, "E": 1.0, "F": -1.6, "O": -0.6}
    assert_fits(recorded(lambda out: print_eval(report, out)))
