"""`keep:` in real training: the demo's tiny LLaVA (real processor and chat template), the transformers Trainer
integration, both targets, 4-bit bitsandbytes on CPU, gradient checkpointing and a layer schedule."""

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import run_two_ranks
from PIL import Image
from transformers import TrainerCallback, TrainingArguments

from mmtuning_plugin.demo.data import make_set
from mmtuning_plugin.demo.model import MODEL_DIR, encode, training_batch
from mmtuning_plugin.demo.runner import load_base, load_processor
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.integrations.hf import MMTuningTrainer
from mmtuning_plugin.base_view import adapters_disabled
from mmtuning_plugin.keep import Keep, cpu_4bit_repack_off
from mmtuning_plugin.session import MMTuning

PROMPTS = ["what is the colour of the shape ?", "what shape is in the image ?"]


@pytest.fixture(scope="module")
def processor():
    return load_processor(MODEL_DIR)


@pytest.fixture(scope="module")
def train_rows(processor):
    return encode(processor, make_set("target", "train", 24, seed=5))


def run(tmp_path, processor, rows, block, steps=4, four_bit=False, model_hook=None, **overrides):
    session = MMTuning(block)
    model = session.wrap(load_base(MODEL_DIR, session, four_bit))
    if model_hook:
        model_hook(model)
    args = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                remove_unused_columns=False, seed=0)
    trainer = MMTuningTrainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=rows,
                              mmtuning=session, processing_class=processor,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    return session, model, trainer


def keep_logs(trainer):
    return [entry["loss_keep"] for entry in trainer.state.log_history if "loss_keep" in entry]


def lora_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("target", ["kl", "answers"])
def test_keep_term_is_logged_non_zero_and_adapters_train(tmp_path, processor, train_rows, caplog, target):
    block = {"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS, "target": target, "ramp_steps": 1,
                                                            "batch_size": 2, "pool": 8}}
    session, model, trainer = run(tmp_path, processor, train_rows, block)
    before = lora_snapshot(model)
    with caplog.at_level(logging.INFO, logger="mmtuning.keep"):
        trainer.train()
    values = keep_logs(trainer)
    assert len(values) == 3 and all(v > 0 for v in values)  # step 0: weight 0 on the ramp, not computed
    after = lora_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    report = session.keep.report
    assert report["prompts"] == 2 and report["target"] == target
    assert all("<|im_start|>assistant" in t for t in report["templates"])  # the run's own chat template
    assert report["examples"] and all(e["base_answer"] for e in report["examples"])
    assert "mmtuning keep base answer" in caplog.text and "mmtuning keep template" in caplog.text
    if target == "answers":  # generated once, before training, from the training set's images
        assert len(session.keep.pool) == 8
        eos = processor.tokenizer.eos_token_id
        assert all(row.answer_ids and row.answer_ids[-1] == eos for row in session.keep.pool)


def test_keep_pulls_toward_the_base(tmp_path, processor, train_rows):
    """Same seed, same stream: with keep the model stays nearer to its base on the keep prompts."""
    def distance(block):
        session, model, trainer = run(tmp_path, processor, train_rows, block, steps=6, learning_rate=2e-2)
        trainer.train()
        keep = session.keep or Keep(MMTuning({"keep": {"prompts": PROMPTS}}).config.keep)
        if session.keep is None:
            keep.prepare(model, processor, training_batches=[training_batch(train_rows[:4], 0)], total_steps=6)
        model.train()
        keep.step, keep.total_steps, keep._checked_graph = 6, 6, True
        with torch.no_grad():
            return float(keep._kl(model, keep._example_rows()))

    plain = distance({"language": {"modules": "attention"}})
    kept = distance({"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS, "weight": 5.0, "ramp": 0}})
    assert kept < plain


def test_kl_covers_the_base_answer_to_its_end_of_turn_token(processor, train_rows):
    """`target: kl` follows the base's greedy answer to its end: its positions are the tokens the base
    generates (end-of-turn included), so a tuned model that says the old word and then runs on is pulled back."""
    session = MMTuning({"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS, "batch_size": 4}})
    model = session.wrap(load_base(MODEL_DIR, session, False))
    keep = session.keep
    keep.prepare(model, processor, training_batches=[training_batch(train_rows[:4], processor.tokenizer.pad_token_id)],
                 total_steps=4)
    rows = keep._example_rows()
    expected = keep._generate(model, rows)  # model.generate with the adapters off, up to end-of-turn
    eos = processor.tokenizer.eos_token_id
    assert all(answer[-1] == eos for answer in expected) and max(map(len, expected)) >= 2
    from mmtuning_plugin.keep.rows import prompt_batch

    model.train()
    with torch.no_grad(), adapters_disabled(model):
        _, base, live = keep._base_answer(model, prompt_batch(rows, keep.pad_id))
        assert keep._use_cache  # LLaVA decodes through its key/value cache
        keep._use_cache = False
        grown, reread, _ = keep._base_answer(model, prompt_batch(rows, keep.pad_id))  # each token re-reads its row
    followed = [base[i].argmax(-1)[live[i].bool()].tolist() for i in range(len(rows))]
    assert followed == expected
    assert torch.allclose(base[live.bool()], reread[live.bool()], atol=1e-4)
    assert grown["input_ids"].shape[1] == prompt_batch(rows, keep.pad_id)["input_ids"].shape[1] + base.shape[1] - 1
    with torch.no_grad():
        assert float(keep._kl(model, rows)) == pytest.approx(0.0, abs=1e-6)  # adapters start as the identity


def test_adapters_off_is_a_flag_and_frozen_schedule_layers_stay_frozen(tmp_path, processor, train_rows):
    """Language layers 0-2 are frozen for the whole run by a custom schedule: the keep forwards switch adapters
    off and on every step, and those layers' adapters must neither get requires_grad back nor change."""
    block = {"language": {"modules": "attention", "schedule": {"type": "custom", "stages": [{"at": 0, "layers": [3]}]}},
             "keep": {"prompts": PROMPTS, "ramp": 0, "fuse": False, "refresh": 1}}  # its own forwards every step
    session, model, trainer = run(tmp_path, processor, train_rows, block, steps=3)
    before = lora_snapshot(model)
    seen = []

    def spy(module, args):  # requires_grad of a frozen layer's adapter, seen from inside every forward
        seen.append(any(p.requires_grad for n, p in model.named_parameters()
                        if "language_model.layers.0." in n and "lora_" in n))

    class Spy(TrainerCallback):  # from the first step on (the schedule freezes at train begin)
        def on_train_begin(self, *args, **kwargs):
            self.handle = model.get_base_model().model.language_model.register_forward_pre_hook(spy)

        def on_train_end(self, *args, **kwargs):
            self.handle.remove()

    trainer.add_callback(Spy())
    trainer.train()
    assert len(seen) >= 3 * 3 and not any(seen)  # task + base + tuned forward per step
    after = lora_snapshot(model)
    frozen = [n for n in before if "language_model.layers." in n and ".layers.3." not in n]
    trained = [n for n in before if ".language_model.layers.3." in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trained)


def test_keep_with_4bit_cpu_base_never_repacks_and_trains(tmp_path, processor, train_rows):
    """FACTS §10: on CPUs with AVX512-BF16 a Linear4bit run in eval mode without grad repacks its weight in place
    and training fails afterwards. The flag is forced on (as on such a CPU): generating the base's answers in
    eval mode, and the no-grad base forwards, must not repack."""
    import bitsandbytes as bnb

    def as_on_avx512bf16(model):
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True

    block = {"language": {"modules": "attention"}, "quant": "balanced",
             "keep": {"prompts": PROMPTS, "target": "answers", "ramp_steps": 1, "pool": 4}}
    session, model, trainer = run(tmp_path, processor, train_rows, block, steps=3, four_bit=True, model_hook=as_on_avx512bf16)
    trainer.train()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(m.support_avx512bf16_for_cpu for m in layers)  # restored after generation
    assert len(keep_logs(trainer)) == 2


def test_the_repack_this_guards_against_is_real(processor):
    """Without the guard the same eval-mode no-grad forward repacks (so the test above can fail on its cause)."""
    import bitsandbytes as bnb

    model = load_base(MODEL_DIR, MMTuning({}), four_bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = True
    batch = training_batch(encode(processor, make_set("general", "eval", 1)), 0)
    batch.pop("labels")
    model.eval()
    with torch.no_grad(), cpu_4bit_repack_off(model):
        model(**batch)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    with torch.no_grad():
        model(**batch)
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_keep_with_gradient_checkpointing_and_accumulation(tmp_path, processor, train_rows):
    block = {"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS, "ramp": 0, "batch_size": 2}}
    session, model, trainer = run(tmp_path, processor, train_rows, block, steps=2, gradient_checkpointing=True,
                                  gradient_accumulation_steps=2)
    before = lora_snapshot(model)
    trainer.train()
    values = keep_logs(trainer)  # step 0: adapters still equal the base (LoRA B starts at 0), so KL is 0
    assert len(values) == 2 and values[0] >= -1e-6 and values[1] > 0  # 0 up to float rounding at step 0
    assert session.keep.accumulation == 2
    after = lora_snapshot(model)
    assert all(torch.isfinite(after[n]).all() for n in after)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_keep_data_and_image_folder_rows_go_through_the_processor(tmp_path, processor):
    folder = tmp_path / "pics"
    folder.mkdir()
    for index, item in enumerate(make_set("general", "eval", 3)):
        item.image.save(folder / f"{index}.png")
    (tmp_path / "keep.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "<image>what shape is in the image ?"},
                      {"role": "assistant", "content": "never read"}], "images": ["pics/0.png"]},
        {"conversations": [{"from": "human", "value": "what is the colour of the shape ?"}], "images": "pics/1.png"},
    ]))
    session = MMTuning({"keep": {"prompts": PROMPTS, "images": str(folder), "data": str(tmp_path / "keep.jsonl")}})
    model = session.wrap(load_base(MODEL_DIR, session, four_bit=False))
    report = session.prepare_keep(model, processor, total_steps=10)
    pool = session.keep.pool
    assert len(pool) == 2 * 3 + 2 and report["rows"] == 8
    expected = processor(text=[pool[0].text], images=[Image.open(folder / "0.png").convert("RGB")], return_tensors="pt")
    assert pool[0].prompt_ids == expected["input_ids"][0].tolist()
    assert torch.equal(pool[0].images[0]["pixel_values"], expected["pixel_values"][0])
    assert "never read" not in pool[6].text and "what shape is in the image" in pool[6].text
    assert [len(r.images) for r in pool[6:]] == [1, 1]


def test_spliced_training_image_rows_match_the_processor(processor, train_rows):
    """`images: train` reuses the batch's processed images: the row equals what the processor would build."""
    from mmtuning_plugin.keep.rows import prompt_tokens, splice, template_renderer, training_images

    batch = training_batch(train_rows[:2], processor.tokenizer.pad_token_id)
    images = training_images(batch, 300)
    assert len(images) == 2
    render = template_renderer(processor)
    row = splice(*prompt_tokens(PROMPTS[0], 1, processor, render), [images[1]], 300)
    item = make_set("target", "train", 24, seed=5)[1]
    expected = processor(text=[row.text], images=[item.image], return_tensors="pt")
    assert row.prompt_ids == expected["input_ids"][0].tolist()


@pytest.mark.parametrize("target", ["kl", "answers"])
def test_fused_keep_rows_give_the_separate_term_and_leave_the_task_loss_alone(tmp_path, processor, train_rows, target):
    """`fuse: true` runs the keep rows in the training forward: joined as rows of their own, or (kl, keep rows
    about the batch's own images) packed behind the training row holding their image, the image prefix read once
    (keep/shared_prefix.py). Either way one forward gives the same keep term, task loss and adapter gradients as
    the task forward plus the keep rows' own forward (dropout off, same weights)."""
    results = {}
    modes = ("separate", "joined", "packed") if target == "kl" else ("separate", "joined")
    for mode in modes:
        block = {"vision": {"modules": "attention", "layers": {"top": 1}}, "language": {"modules": "attention"},
                 "dropout": 0.0, "keep": {"prompts": PROMPTS, "target": target, "ramp_steps": 0, "batch_size": 3,
                                          "pool": 6, "fuse": mode != "separate", "refresh": 1}}
        torch.manual_seed(0)
        session, model, trainer = run(tmp_path, processor, train_rows, block)
        for name, parameter in model.named_parameters():  # non-zero B: the tuned model differs from its base
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
        session.prepare_keep(model, processor, training_batches=[training_batch(train_rows[:4], 0)], total_steps=4)
        session.keep._packing = mode == "packed"
        trainer.current_gradient_accumulation_steps = 1
        model.train()
        batch = training_batch(train_rows[:4], processor.tokenizer.pad_token_id)
        fused = session.fuse_keep(model, batch)
        session.keep._pending, session.keep.micro, session.keep._cached = None, 0, None  # through compute_loss
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[mode] = (loss.item(), trainer._mmtuning_logs["loss_keep"][0], fused,
                         {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    loss, keep, same, grads = results["separate"]
    assert same is not None and set(same) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    joined = results["joined"][2]
    assert joined["input_ids"].shape[0] == 4 + 3 and joined["pixel_values"].shape[0] == 4 + 3
    assert (joined["labels"][4:] == -100).all() and torch.equal(joined["labels"][:4, :same["labels"].shape[1]], same["labels"])
    if "packed" in results:  # 4 rows, the keep suffixes behind them, no second image; block mask, own positions
        packed = results["packed"][2]
        assert packed["input_ids"].shape[0] == 4 and packed["pixel_values"].shape[0] == 4
        assert packed["attention_mask"].dim() == 4 and "position_ids" in packed
        assert torch.equal(packed["labels"][:, :same["labels"].shape[1]], same["labels"])
        assert (packed["labels"][:, same["labels"].shape[1]:] == -100).all()
    assert keep > 0
    for mode in modes[1:]:
        fused_loss, fused_keep, _, fused_grads = results[mode]
        assert fused_keep == pytest.approx(keep, rel=1e-4), mode
        assert fused_loss == pytest.approx(loss, rel=1e-5), mode
        assert set(grads) == set(fused_grads), mode
        assert all(torch.allclose(grads[n], fused_grads[n], atol=1e-5, rtol=1e-3) for n in grads), mode


def test_joined_rows_pad_each_row_at_its_end_and_refuse_what_cannot_join():
    from mmtuning_plugin.keep import joined_rows

    task = {"input_ids": torch.tensor([[5, 6, 7], [0, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
            "labels": torch.tensor([[-100, 6, 7], [-100, -100, 9]]), "pixel_values": torch.zeros(2, 3, 4, 4)}
    keep = {"input_ids": torch.tensor([[0, 1, 2, 3, 4]]), "attention_mask": torch.tensor([[0, 1, 1, 1, 1]]),
            "pixel_values": torch.ones(1, 3, 4, 4, dtype=torch.float64)}
    joined = joined_rows(task, keep, pad_id=0)
    assert joined["input_ids"].tolist() == [[5, 6, 7, 0, 0], [0, 8, 9, 0, 0], [0, 1, 2, 3, 4]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert joined["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 9, -100, -100], [-100] * 5]
    assert joined["pixel_values"].dtype == torch.float32 and joined["pixel_values"][2].eq(1).all()
    assert joined_rows({**task, "token_type_ids": torch.zeros(2, 3, dtype=torch.long)}, keep, 0) is None
    assert joined_rows(task, {**keep, "pixel_values": torch.ones(1, 3, 8, 8)}, 0) is None
    assert joined_rows({**task, "pixel_values": [torch.zeros(3, 4, 4)] * 2}, keep, 0) is None


def test_refresh_asks_the_same_rows_for_k_calls_and_decodes_the_base_once(tmp_path, processor, train_rows):
    block = {"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS, "ramp_steps": 0, "batch_size": 2,
                                                            "refresh": 3, "fuse": True}}
    session, model, trainer = run(tmp_path, processor, train_rows, block, steps=6)
    keep, steps = session.keep, []
    build = keep._kl_step

    def recorded(*args):
        steps.append(build(*args))
        return steps[-1]

    keep._kl_step = recorded
    before = lora_snapshot(model)
    trainer.train()
    values = keep_logs(trainer)
    assert len(steps) == 2  # calls 0-2 ask one set of rows, calls 3-5 the next
    assert len(values) == 6 and all(v >= 0 for v in values) and values[-1] > 0
    assert not torch.equal(steps[0].batch["pixel_values"], steps[1].batch["pixel_values"])  # new images for new rows
    after = lora_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert "new rows every 3 micro-batches, in the training forward (fuse)" in "\n".join(
        __import__("mmtuning_plugin.keep", fromlist=["describe"]).describe(keep.report))


def test_ramp_and_every():
    keep = Keep(MMTuning({"keep": {"prompts": PROMPTS, "weight": 0.2, "ramp": 0.5}}).config.keep)
    keep.total_steps = 10
    assert [round(keep.factor(s), 4) for s in (0, 1, 5, 9)] == [0.0, 0.04, 0.2, 0.2]
    every = Keep(MMTuning({"keep": {"prompts": PROMPTS, "ramp_steps": 0, "ramp": 0, "every": 2}}).config.keep)
    assert [every.factor(s) for s in range(4)] == [0.4, 0.0, 0.4, 0.0]


@pytest.mark.parametrize("block, key, fix", [
    ({}, "mmtuning.keep", "prompts:"),
    ({"prompts": []}, "mmtuning.keep.prompts", "questions of the skills"),
    ({"prompts": PROMPTS, "weight": -0.1}, "mmtuning.keep.weight", "positive weight"),
    ({"prompts": PROMPTS, "ramp": 1.5}, "mmtuning.keep.ramp", "ramp_steps: 1.5"),
    ({"prompts": PROMPTS, "target": "logits"}, "mmtuning.keep.target", "'kl' or 'answers'"),
    ({"prompts": PROMPTS, "refresh": 0}, "mmtuning.keep.refresh", "greater than or equal to 1"),
    ({"prompts": PROMPTS, "fuse": "maybe"}, "mmtuning.keep.fuse", "valid boolean"),
])
def test_bad_keep_settings_name_the_key_and_the_fix(block, key, fix):
    with pytest.raises(MMTuningError) as error:
        MMTuning({"keep": block})
    assert f"{key}:" in str(error.value) and fix in str(error.value)


def test_bad_keep_files_fail_before_weights_load(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    (tmp_path / "answers.jsonl").write_text('{"messages": [{"role": "assistant", "content": "red"}]}\n')
    cases = [({"prompts": PROMPTS, "images": str(tmp_path / "empty")}, "keep.images", "has no images"),
             ({"data": str(tmp_path / "bad.jsonl")}, "keep.data", "line 2"),
             ({"data": str(tmp_path / "answers.jsonl")}, "keep.data", "no user turn"),
             ({"data": str(tmp_path / "missing.jsonl")}, "keep.data", "no such file"),
             ({"prompts": str(tmp_path / "nope.txt")}, "keep.prompts", "one prompt per line")]
    for block, key, fix in cases:
        with pytest.raises(MMTuningError) as error:
            MMTuning({"keep": block})
        assert f"mmtuning.{key}:" in str(error.value) and fix in str(error.value), str(error.value)


def test_keep_without_adapters_on_the_path_to_the_logits_is_refused():
    session = MMTuning({"vision": {}, "language": False, "keep": {"prompts": PROMPTS, "images": "none"}})
    with pytest.raises(MMTuningError, match="no adapter sits on their path"):
        session.wrap(load_base(MODEL_DIR, session, four_bit=False))


def test_cli_reports_bad_keep_as_exit_2(tmp_path):
    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text("mmtuning:\n  keep:\n    prompts: []\n")
    result = CliRunner().invoke(app, ["inspect-targets", "llava", "--spec", str(spec)])
    assert result.exit_code == 2 and "mmtuning.keep.prompts" in result.output


def test_keep_under_two_process_gloo_ddp_keeps_ranks_identical_and_frozen_layers_frozen(tmp_path):
    """tests/dist/keep_ranks.py under torchrun: the Trainer wraps the model in DDP, the keep forwards run on the
    inner module and their gradients are reduced in the task loss's backward, so the adapters stay identical
    although each rank's keep rows come from its own training images; with `fuse` they ride in the DDP forward."""
    run_two_ranks(Path(__file__).parent / "dist" / "keep_ranks.py", tmp_path, timeout=360)
    for mode in ("auto", "false", "fused"):
        ranks = [torch.load(tmp_path / f"rank{r}_{mode}.pt") for r in (0, 1)]
        assert all(r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel" for r in ranks)
        for rank in ranks:  # step 0: LoRA B is 0, the adapters equal the base, so KL is 0
            assert len(rank["keep"]) == 3 and all(v > 0 for v in rank["keep"][1:]), (mode, rank["keep"])
        assert ranks[0]["keep"][1:] != ranks[1]["keep"][1:]  # each rank kept its own images
        before, after = ranks[0]["before"], ranks[0]["after"]
        assert all(torch.equal(value, ranks[1]["after"][name]) for name, value in after.items()), mode
        frozen = [n for n in after if "language_model.layers." in n and ".layers.3." not in n]
        trained = [n for n in after if ".language_model.layers.3." in n]
        assert frozen and all(torch.equal(before[n], after[n]) for n in frozen), mode
        assert any(not torch.equal(before[n], after[n]) for n in trained), mode


def test_a_trainer_without_the_processor_is_told_to_pass_processing_class(tmp_path, processor, train_rows):
    session = MMTuning({"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS}})
    model = session.wrap(load_base(MODEL_DIR, session, False))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False, save_strategy="no")
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=train_rows, mmtuning=session,
                              data_collator=lambda r: training_batch(r, processor.tokenizer.pad_token_id))
    with pytest.raises(MMTuningError, match="processing_class=processor"):
        trainer.train()


@pytest.mark.parametrize("task_rows, accumulation, batch_size, chunk", [
    (1, 8, None, 1), (1, 8, None, 2), (1, 1, None, 2), (16, 1, None, 2), (2, 4, 3, 1), (1, 8, 8, 2), (4, 2, 1, 2),
    (1, 8, 3, 2)])
def test_keep_rows_are_per_optimizer_step_whatever_the_accumulation(task_rows, accumulation, batch_size, chunk):
    """`per: step` (the default): `batch_size` keep rows per optimizer step (default half its training rows, so one
    row every second step at micro-batch 1), spread over its micro-batches, in groups of `chunk` (the prompts about
    one image) where a step has fewer rows than micro-batches. Every row of the run is asked once, in order; each
    step's scales make its term weigh rows / rate (the mean over its rows when the rate is whole); the same (step,
    micro-batch) always asks the same rows (a resumed run)."""
    from mmtuning_plugin.config import KeepSpec
    from mmtuning_plugin.keep import keep_share

    spec = KeepSpec(prompts=PROMPTS, batch_size=batch_size)
    rate = batch_size or task_rows * accumulation / 2
    asked = []
    for step in range(8):
        shares = [keep_share(spec, task_rows, step, m, accumulation, chunk) for m in range(accumulation)]
        rows = sum(s.rows for s in shares)
        assert rows in (int(rate), int(rate) + 1)
        assert all(s.rows <= max(chunk, -(-rows // accumulation)) for s in shares)
        assert sum(s.scale for s in shares) / accumulation == pytest.approx(rows / rate)
        asked += [s.first + i for s in shares for i in range(s.rows)]
        again = [keep_share(spec, task_rows, step, m, accumulation, chunk) for m in range(accumulation)]
        assert [(s.rows, s.first) for s in shares] == [(s.rows, s.first) for s in again]
    assert asked == list(range(int(8 * rate)))
    per_micro = KeepSpec(prompts=PROMPTS, batch_size=batch_size, per="micro-batch")
    assert all(keep_share(per_micro, task_rows, 0, m, accumulation).rows == (batch_size or max(1, (task_rows + 1) // 2))
               for m in range(accumulation))


def test_the_base_reads_a_shared_image_once_and_answers_as_from_whole_prompts(processor, train_rows):
    """Keep rows asking several prompts about one training image: the base reads the image prefix once and copies
    its cache (the decoding that a micro-batch of 1 with several prompts takes); same answers and logits as each
    row reading its whole prompt."""
    from mmtuning_plugin.keep.rows import prompt_batch, training_images

    session = MMTuning({"language": {"modules": "attention"}, "keep": {"prompts": PROMPTS}})
    model = session.wrap(load_base(MODEL_DIR, session, False))
    perturb = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05, generator=perturb)
    keep = session.keep
    batch = training_batch(train_rows[:2], processor.tokenizer.pad_token_id)
    keep.prepare(model, processor, training_batches=[batch], total_steps=4)
    images = training_images(batch, keep.image_id)
    rows = [keep._spliced(PROMPTS[i % 2], images[i // 2], i // 2) for i in range(4)]  # 2 prompts x 2 images
    model.train()
    results = {}
    for sharing in (True, False):
        keep._sharing = sharing
        with torch.no_grad(), adapters_disabled(model):
            if sharing:
                assert keep._shared_first_step(model, rows) is not None
            results[sharing] = keep._base_answer(model, prompt_batch(rows, keep.pad_id), rows)
    (shared_batch, shared, live), (whole_batch, whole, whole_live) = results[True], results[False]
    assert torch.equal(live, whole_live) and torch.equal(shared_batch["input_ids"], whole_batch["input_ids"])
    assert torch.allclose(shared[live.bool()], whole[live.bool()], atol=1e-4)
