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
from mmtuning_plugin.tiny import tiny_model

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
