"""The pluggy extension API: built-ins register through the hook, and so can a third-party package."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mmtuning_plugin import plugins
from mmtuning_plugin.arch import lookup_map, registered_maps
from mmtuning_plugin.targets import apply_plan, plan_targets
from mmtuning_plugin.testing.tiny import tiny_model

HERE = Path(__file__).parent
ROOT = HERE.parent


def install_example_plugin(site: Path) -> None:
    """A real distribution on sys.path: module + .dist-info with an `mmtuning` entry point (what pip writes)."""
    shutil.copy(HERE / "example_plugin" / "mmtuning_ovis2.py", site / "mmtuning_ovis2.py")
    info = site / "mmtuning_ovis2-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmtuning-ovis2\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmtuning]\novis2 = mmtuning_ovis2\n")
    (info / "RECORD").write_text("")


def run_cli(*args, site=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mmtuning_plugin.cli", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def test_builtin_maps_come_through_the_same_hook_and_entry_point_names():
    manager = plugins.plugin_manager()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mmtuning"]
    assert declared == plugins.BUILTIN_PLUGINS
    for name in declared:
        assert manager.get_plugin(name) is not None
    assert lookup_map("qwen2_5_vl").source == "builtin"


def test_an_installed_plugin_adds_an_architecture_to_inspect_targets(tmp_path):
    without = run_cli("inspect-targets", "ovis2", "--json")  # ovis2 has a built-in map; the plugin's overrides it
    assert without.returncode == 0 and json.loads(without.stdout)["map_source"] == "builtin"

    install_example_plugin(tmp_path)
    with_plugin = run_cli("inspect-targets", "ovis2", "--json", "--set", "vision=true", site=tmp_path)
    assert with_plugin.returncode == 0, with_plugin.stderr
    report = json.loads(with_plugin.stdout)
    assert report["map_source"] == "mmtuning-ovis2 (example plugin)"
    assert report["modalities"]["projector"]["modules"] == ["model.vision_tower.head_linear"]
    assert report["modalities"]["vision"]["layers"] == 24
    assert len(report["modalities"]["vision"]["targeted"]) == 24 * 7


def test_a_plugin_registered_at_runtime_drives_planning_and_wrapping():
    sys.path.insert(0, str(HERE / "example_plugin"))
    try:
        import mmtuning_ovis2

        plugins.register_plugin(mmtuning_ovis2, name="ovis2-test")
        assert registered_maps()["ovis2"].source == "mmtuning-ovis2 (example plugin)"
        # one registration serves convert too: the layout history comes from the plugin's map
        from mmtuning_plugin.convert.layouts import family_of
        assert family_of("ovis2").steps == mmtuning_ovis2.OVIS2.history.steps
        model = tiny_model("ovis2")
        plan = plan_targets(model, {"vision": {"layers": {"top": 1}}})
        assert [m.name for m in plan.modules_of("projector")] == ["model.vision_tower.head_linear"]
        apply_plan(model, plan)  # verified: PEFT wrapped exactly this
    finally:
        plugins.unregister_plugin(mmtuning_ovis2)
        sys.path.remove(str(HERE / "example_plugin"))
    assert registered_maps()["ovis2"].source == "builtin"


def test_a_plugin_registering_a_wrong_object_gets_a_clear_error():
    class Broken:
        @staticmethod
        @plugins.hookspecs.hookimpl
        def register_architectures(register):
            register({"model_types": ["x"]})

    plugins.register_plugin(Broken, name="broken")
    try:
        with pytest.raises(Exception, match="pass a mmtuning_plugin.arch.ModalityMap"):
            registered_maps()
    finally:
        plugins.unregister_plugin(Broken)


def test_mmtune_plugins_lists_hooks_registrations_and_overrides():
    import dataclasses

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app
    from mmtuning_plugin.losses import registered_losses

    sys.path.insert(0, str(HERE / "example_plugin"))
    builtin_llava = lookup_map("llava")

    class LlavaOverride:  # a later plugin re-registering a built-in model type wins it
        @staticmethod
        @plugins.hookspecs.hookimpl
        def register_architectures(register):
            register(dataclasses.replace(builtin_llava, source="override-test"))

    try:
        import mmtuning_hidden_norm
        import mmtuning_ovis2

        plugins.register_plugin(mmtuning_ovis2, name="ovis2-test")
        plugins.register_plugin(mmtuning_hidden_norm, name="hidden-norm-test")
        plugins.register_plugin(LlavaOverride, name="llava-override")
        result = CliRunner().invoke(app, ["plugins", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        by_name = {p["name"]: p for p in report["plugins"]}
        assert by_name["builtin_losses"]["builtin"] and by_name["builtin_losses"]["hooks"] == ["register_losses"]
        assert "top_down" in by_name["builtin_schedules"]["registered"]["schedules"]
        assert by_name["ovis2-test"]["registered"] == {"architectures": ["ovis2"]}
        assert by_name["hidden-norm-test"] == {"name": "hidden-norm-test", "module": "mmtuning_hidden_norm",
                                               "builtin": False, "hooks": ["register_losses"],
                                               "registered": {"losses": ["hidden_norm"]}}
        assert {"kind": "architectures", "name": "llava", "plugin": "llava-override",
                "overrode": "builtin_architectures"} in report["overrides"]
        # ovis2 has a built-in map too now, so the example plugin's map takes it over as well
        assert {(o["plugin"], o["overrode"]) for o in report["overrides"]} == {
            ("llava-override", "builtin_architectures"), ("ovis2-test", "builtin_architectures")}
        assert lookup_map("llava").source == "override-test" and "hidden_norm" in registered_losses()
        assert {h["hook"]: h["signature"] for h in report["hooks"]}["register_losses"] == \
            "register(name: str, loss_class: type[AlignmentLoss])"
        table = CliRunner().invoke(app, ["plugins"], terminal_width=160)
        assert table.exit_code == 0
        assert "architectures 'llava': llava-override overrides builtin_architectures" in table.output
    finally:
        for name in ("ovis2-test", "hidden-norm-test", "llava-override"):
            plugin = plugins.plugin_manager().get_plugin(name)
            if plugin is not None:
                plugins.unregister_plugin(plugin)
        sys.path.remove(str(HERE / "example_plugin"))
    assert lookup_map("llava").source == "builtin"


@pytest.mark.parametrize("hook, call, message", [
    ("register_losses", lambda register: register("bad", object), "register(name: str, loss_class: type[AlignmentLoss])"),
    ("register_losses", lambda register: register(3, dict), "subclass of mmtuning_plugin.losses.base.AlignmentLoss"),
    ("register_schedules", lambda register: register("bad"), "register(name: str, schedule_class: type[LayerSchedule])"),
])
def test_every_registry_checks_its_register_calls_the_same_way(hook, call, message):
    from mmtuning_plugin.errors import MMTuningError

    plugin = type("Bad", (), {hook: staticmethod(plugins.hookspecs.hookimpl(call))})
    plugins.register_plugin(plugin, name="bad-plugin")
    try:
        with pytest.raises(MMTuningError, match="Plugin 'bad-plugin'") as error:
            plugins.registered(hook.removeprefix("register_"))
        assert message in str(error.value)
    finally:
        plugins.unregister_plugin(plugin)
