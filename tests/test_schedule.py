"""Layer schedules and per-modality learning rates: pure stage functions, optimizer groups, frozen stages
bit-identical, resume equivalence with the HF Trainer, gradient checkpointing, 2-process DDP (gloo)."""

from pathlib import Path
from typing import Literal

import pytest
import torch
from helpers import run_two_ranks
from transformers import TrainingArguments

from mmtuning_plugin import plugins
from mmtuning_plugin.config import LayerSchedule, load_config
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.hookspecs import hookimpl
from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
from mmtuning_plugin.schedules import LayerScheduler, Stage, active_of, schedule_plan
from mmtuning_plugin.session import MMTuning
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
VISION = "base_model.model.model.vision_tower.encoder.layers."
LANGUAGE = "base_model.model.model.language_model.layers."


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def layer_of(name, prefix):
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def make_trainer(tmp_path, config, max_steps, seed=0, **extra):
    torch.manual_seed(seed)
    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2)
    model, session = prepare_model(model, config)
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=5e-3,
                  weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  disable_tqdm=True, remove_unused_columns=False, seed=seed, data_seed=seed)
    kwargs.update(extra)
    trainer = MMTuningTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=RepeatedBatch(batch.inputs, 16),
                              data_collator=stack_rows, mmtuning=session)
    return model, session, trainer


# --- pure stage functions -------------------------------------------------------------------------


def plan_of(config):
    session = MMTuning(config)
    session.wrap(tiny_model("llava"))
    return session.schedule()


def test_top_down_adds_layers_downward_every_n_steps_and_is_a_pure_function_of_the_step():
    sched = plan_of({"language": {"schedule": {"type": "top_down", "start": 1, "step_layers": 2, "every": 10}}})
    steps = {step: sched.active(step, 100)["language"].layers for step in (25, 0, 9, 10, 19, 20, 99)}
    assert steps == {0: (3,), 9: (3,), 10: (1, 2, 3), 19: (1, 2, 3), 20: (0, 1, 2, 3), 25: (0, 1, 2, 3), 99: (0, 1, 2, 3)}
    assert sched.active(10, 100) == sched.active(10, 100)  # no hidden state


def test_fractions_resolve_against_total_steps_and_default_every_reaches_all_layers_at_half():
    sched = plan_of({"language": {"schedule": "top_down"}})  # 4 layers, start 1: changes at 1/6, 2/6, 3/6
    assert [sched.active(s, 60)["language"].layers for s in (0, 9, 10, 20, 29, 30)] == \
        [(3,), (3,), (2, 3), (1, 2, 3), (1, 2, 3), (0, 1, 2, 3)]
    assert sched.active(15, 120)["language"].layers == (3,)  # same fraction, other length: other step


def test_custom_stages_and_projector_window():
    sched = plan_of({"language": {"schedule": {"type": "custom", "stages": [{"at": 5, "layers": {"top": 2}},
                                                                            {"at": 0.5, "layers": "all"}]}},
                     "projector": {"schedule": {"from": 2, "until": 0.75}}})
    rows = [(s, sched.active(s, 20)["language"].describe(), sched.active(s, 20)["projector"].describe())
            for s in (0, 2, 5, 10, 15)]
    assert rows == [(0, "off", "off"), (2, "off", "on"), (5, "2-3", "on"), (10, "0-3", "on"), (15, "0-3", "off")]
    assert [r["step"] for r in sched.timeline(20)] == [0, 2, 5, 10, 15]
    assert sched.stage_list()["language"] == [{"at": "step 0", "layers": "off"}, {"at": "step 5", "layers": "2-3"},
                                              {"at": "50%", "layers": "0-3"}]


def test_stages_resolving_to_the_same_step_take_the_later_one():
    assert active_of([Stage(0, (1,), True), Stage(10, (2,), True), Stage(0.5, (3,), True)], 10, 20).layers == (3,)


@pytest.mark.parametrize("config, message", [
    ({"language": {"schedule": {"type": "top_down", "start": 4}}}, "already covers all 4 targeted layers"),
    ({"language": {"schedule": {"type": "top_down", "every": 1.5}}}, "mmtuning.language.schedule.every: 1.5"),
    ({"language": {"schedule": "bottom_up"}}, "unknown schedule 'bottom_up'; known: custom, static, top_down"),
    ({"projector": {"schedule": {"form": 3}}}, "projector takes `always`, `{from: N}`"),
    ({"language": {"layers": {"top": 2}, "schedule": {"type": "custom", "stages": [{"at": 0, "layers": [0]}]}}},
     "layers [0] get no adapters"),
    ({"vision": {"enabled": False, "lr": 2.0}}, "vision is disabled"),
    ({"projector": {"lr_decay": 0.5}}, "projector has no layers"),
])
def test_schedule_errors_name_the_key_and_the_fix(config, message):
    with pytest.raises(MMTuningError, match=None) as error:
        plan_of(config)
    assert message in str(error.value)


def test_a_fraction_without_a_step_count_is_an_error():
    sched = plan_of({"language": {"schedule": {"type": "top_down", "every": 0.25}}})
    with pytest.raises(MMTuningError, match="needs the total number of training steps"):
        sched.active(3, None)


def test_a_third_party_schedule_registers_through_the_hook():
    class BottomUp(LayerSchedule):
        type: Literal["bottom_up"] = "bottom_up"
        every: int = 5

        def stages(self, targeted, num_layers, where):
            return [Stage(i * self.every, tuple(targeted[: i + 1]), True) for i in range(len(targeted))]

    class Plugin:
        @hookimpl
        def register_schedules(self, register):
            register("bottom_up", BottomUp)

    plugin = Plugin()
    plugins.register_plugin(plugin, name="test_bottom_up")
    try:
        sched = plan_of({"language": {"schedule": {"type": "bottom_up", "every": 3}}})
        assert [sched.active(s, None)["language"].layers for s in (0, 3, 9)] == [(0,), (0, 1), (0, 1, 2, 3)]
    finally:
        plugins.unregister_plugin(plugin)


# --- optimizer groups ------------------------------------------------------------------------------


def test_groups_carry_lr_multipliers_and_layer_decay_and_hold_every_adapter_once():
    session = MMTuning({"vision": {"layers": [1, 2], "lr": 0.5, "lr_decay": 0.5}, "projector": {"lr": 3.0},
                        "language": {"schedule": {"type": "top_down", "every": 5}}})
    model = session.wrap(tiny_model("llava"))
    groups = {g["name"]: g for g in session.optimizer_groups(model, 1e-3, 0.01)}
    assert sorted(groups) == ["language", "projector", "vision.layer1", "vision.layer2"]
    assert groups["vision.layer2"]["lr"] == pytest.approx(5e-4) and groups["vision.layer1"]["lr"] == pytest.approx(2.5e-4)
    assert groups["projector"]["lr"] == pytest.approx(3e-3) and groups["language"]["lr"] == pytest.approx(1e-3)
    assert all(layer_of(n, VISION) == 2 for n, p in model.named_parameters()
               if any(p is q for q in groups["vision.layer2"]["params"]))
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for n, p in model.named_parameters() if "lora_" in n]
    assert sorted(grouped) == sorted(trainable)


# --- mechanics with the HF Trainer -----------------------------------------------------------------


def test_inactive_layers_are_bit_identical_after_optimizer_steps_with_weight_decay(tmp_path):
    # every: 100 never comes within 6 steps: language layers 0-1 and vision layer 1 must not move at all
    config = {"vision": {"layers": [1, 2], "schedule": {"type": "top_down", "start": 1, "every": 100}},
              "language": {"schedule": {"type": "top_down", "start": 2, "every": 100}}}
    model, _, trainer = make_trainer(tmp_path, config, max_steps=6)
    before = adapters(model)
    trainer.train()
    after = adapters(model)
    frozen = {n for n in after if layer_of(n, LANGUAGE) in (0, 1) or layer_of(n, VISION) == 1}
    assert frozen and any("lora_A" in n for n in frozen) and any("lora_B" in n for n in frozen)
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved == set(after) - frozen  # every active A and B matrix trained (B starts at zero)
    params = {id(p): n for n, p in model.named_parameters()}
    assert all(params[id(p)] not in frozen for p in trainer.optimizer.state)  # no AdamW moments for frozen ones
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored after training


def test_grad_mode_keeps_requires_grad_and_still_leaves_inactive_layers_untouched():
    """The DDP-without-find_unused route: backward computes every grad, the scheduler zeroes inactive ones as they
    arrive (so gradient clipping, which the Trainer runs before on_pre_optimizer_step, counts only active layers)
    and drops them before the step."""
    torch.manual_seed(0)
    session = MMTuning({"language": {"schedule": {"type": "top_down", "start": 1, "every": 100}}})
    model = session.wrap(tiny_model("llava"))
    batch = tiny_batch(model.base_model.model, batch=2)
    scheduler = LayerScheduler(model, session.plan, session.schedule(), 10, mode="grad")
    optimizer = torch.optim.AdamW(session.optimizer_groups(model, 1e-2, 0.1))
    before = adapters(model)
    for step in range(3):
        scheduler.apply(step)
        model(**batch.inputs).loss.backward()
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        inactive = [p for n, p in model.named_parameters() if "lora_" in n and layer_of(n, LANGUAGE) in (0, 1, 2)]
        assert all(p.grad is not None and not p.grad.any() for p in inactive)  # what clipping sees: zeros
        scheduler.drop_inactive_grads()
        optimizer.step()
        optimizer.zero_grad()
    after = adapters(model)
    for name in after:
        layer = layer_of(name, LANGUAGE)
        if layer in (0, 1, 2):
            assert torch.equal(after[name], before[name]), name
        elif layer == 3:
            assert not torch.equal(after[name], before[name]), name


def test_stage_changes_are_logged_in_the_trainer_log_history(tmp_path):
    config = {"language": {"schedule": {"type": "top_down", "start": 2, "step_layers": 2, "every": 0.5}},
              "projector": {"schedule": {"from": 1}}}
    _, _, trainer = make_trainer(tmp_path, config, max_steps=4)
    trainer.train()
    stages = [e for e in trainer.state.log_history if "mmtuning_stage" in e]
    assert stages == [{"step": 0, "mmtuning_stage": {"projector": "off", "language": "2-3"}},
                      {"step": 1, "mmtuning_stage": {"projector": "on", "language": "2-3"}},
                      {"step": 2, "mmtuning_stage": {"projector": "on", "language": "0-3"}}]


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path):
    config = {"vision": {"layers": [0, 1, 2], "schedule": {"type": "top_down", "start": 1, "every": 3}},
              "projector": {"schedule": {"from": 2}},
              "language": {"schedule": {"type": "top_down", "start": 1, "step_layers": 2, "every": 0.25}, "lr": 0.5}}
    straight, _, trainer = make_trainer(tmp_path, config, max_steps=8, save_strategy="steps", save_steps=5)
    trainer.train()  # saves checkpoint-5 (between the stage changes at 4 and 6), runs on to 8 uninterrupted
    expected = adapters(straight)
    assert (tmp_path / "checkpoint-5").is_dir()

    resumed, _, trainer = make_trainer(tmp_path / "resumed", config, max_steps=8)
    with torch.no_grad():  # the checkpoint, not this fresh init, must decide the adapter weights
        for name, param in resumed.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    got = adapters(resumed)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name  # bit-identical
    stages = [e["step"] for e in trainer.state.log_history if "mmtuning_stage" in e]
    assert stages == [0, 2, 3, 4, 6]  # the resumed run adds no duplicate stage entry at step 5


@pytest.mark.parametrize("reentrant", [False, True])
def test_schedule_works_with_gradient_checkpointing(tmp_path, reentrant):
    config = {"language": {"schedule": {"type": "top_down", "start": 2, "every": 100}}, "projector": False}
    model, _, trainer = make_trainer(tmp_path, config, max_steps=3, gradient_checkpointing=True,
                                     gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    before = adapters(model)
    trainer.train()
    after = adapters(model)
    for name in after:
        layer = layer_of(name, LANGUAGE)
        assert torch.equal(after[name], before[name]) == (layer in (0, 1)), name


# --- DDP -----------------------------------------------------------------------------------------


def test_two_process_ddp_gloo_crosses_stage_changes_with_identical_adapters(tmp_path):
    run_two_ranks(ROOT / "tests" / "dist" / "schedule_ranks.py", tmp_path, timeout=360)
    for mode in ("auto", "false"):
        ranks = [torch.load(tmp_path / f"rank{r}_{mode}.pt") for r in (0, 1)]
        for name, value in ranks[0]["after"].items():
            assert torch.equal(value, ranks[1]["after"][name]), (mode, name)
        before, after = ranks[0]["before"], ranks[0]["after"]
        never = {n for n in after if layer_of(n, VISION) == 0}  # its stage (step 8) is after the last step (5)
        assert never
        assert {n for n in after if torch.equal(after[n], before[n])} == never, mode
        assert [e["step"] for e in ranks[0]["stages"]] == [0, 1, 2, 4], mode


# --- mmtune inspect-targets --spec ----------------------------------------------------------------

SPEC = """mmtuning:
  vision:
    layers: {top: 3}
    schedule: {type: top_down, start: 1, every: 0.2}
  projector:
    schedule: {from: 50}
  language:
    schedule: {type: custom, stages: [{at: 0, layers: {top: 2}}, {at: 0.5, layers: all}]}
"""


def test_inspect_targets_shows_the_schedule_as_a_table_and_in_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect-targets", "llava", "--spec", str(spec), "--steps", "400", "--json"])
    assert result.exit_code == 0, result.output
    timeline = json.loads(result.stdout)["schedule"]["timeline"]
    # LLaVA reads vision layer -2: its top 3 usable vision layers are 20-22 (layer 23 feeds nothing)
    assert timeline == [{"step": 0, "vision": "22", "projector": "off", "language": "30-31"},
                        {"step": 50, "vision": "22", "projector": "on", "language": "30-31"},
                        {"step": 80, "vision": "21-22", "projector": "on", "language": "30-31"},
                        {"step": 160, "vision": "20-22", "projector": "on", "language": "30-31"},
                        {"step": 200, "vision": "20-22", "projector": "on", "language": "0-31"}]
    table = runner.invoke(app, ["inspect-targets", "llava", "--spec", str(spec)])
    assert table.exit_code == 0 and "pass --steps N" in table.stdout and "20%" in table.stdout
    plain = runner.invoke(app, ["inspect-targets", "llava"])
    assert "schedule" not in plain.stdout  # static runs: the output is unchanged
    bad = runner.invoke(app, ["inspect-targets", "llava", "--spec", str(spec), "--set", "vision.schedule.start=3"])
    assert bad.exit_code == 2 and "already covers all 3 targeted layers" in bad.stderr


def test_a_schedule_plugin_must_register_a_layer_schedule_class():
    class Plain:  # the old factory shape: no options schema, so typos in its YAML would go unnoticed
        def __init__(self, options):
            pass

    class Plugin:
        @hookimpl
        def register_schedules(self, register):
            register("plain", Plain)

    plugin = Plugin()
    plugins.register_plugin(plugin, name="test_plain")
    try:
        with pytest.raises(MMTuningError, match=r"Plugin 'test_plain'.*subclass of mmtuning_plugin.config.LayerSchedule"):
            plan_of({"language": {"schedule": "plain"}})
    finally:
        plugins.unregister_plugin(plugin)
