"""`mmtune demo`: fine-tune the embedded tiny VLM on a new task twice, plain LoRA vs. the mmtuning recipe,
and score both with the survey's metrics (arXiv 2503.04543): E = target-task accuracy gain, F = change of
accuracy on the general set the model already knew (negative = forgetting), O = E + F.

Both arms start from the same 4-bit base, see the same training stream and are scored by greedy
generation on the same held-out items; only their `mmtuning:` block (recipes.yaml) differs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..base_view import keep_cpu_4bit_layout
from ..errors import MMTuningError
from ..scoring import efo as scores  # the same E/F/O as `mmtune eval`
from .data import make_set
from .model import MODEL_DIR, Encoded, accuracy, encode, predict, training_batch

RECIPES = Path(__file__).parent / "recipes.yaml"
RESULTS = "results.json"
PLOT = "curves.png"


@dataclass
class DemoSettings:
    """Everything a run depends on; the same for both arms."""

    steps: int = 500  # with keep's fuse and refresh the recipe's 500 steps take less time than 400 did
    seed: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    four_bit: bool = True
    eval_items: int = 128  # per set (target, general), held out, fixed across seeds
    curve_points: int = 4  # accuracy measured at this many evenly spaced steps, 0 and the last included
    threads: int = 1  # per arm
    jobs: int = 0  # arms trained at once, one process each; 0 = as many as there are CPU cores (and arms)
    out: Path = Path("mmtune-demo")
    model_dir: Path = MODEL_DIR
    arms: tuple[str, ...] = ("plain_lora", "mmtuning")


@dataclass
class ArmResult:
    name: str
    label: str
    mmtuning: dict[str, Any]
    trainable_params: int
    before: dict[str, float]
    after: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    loss: list[tuple[int, float]] = field(default_factory=list)
    adapter: str = ""
    seconds: float = 0.0
    step_seconds: float = 0.0  # training only (evaluations excluded): wall and this process's CPU time per step
    step_cpu_seconds: float = 0.0
    keep: dict[str, Any] = field(default_factory=dict)  # what `keep:` showed before training (prompts, base answers)

    @property
    def scores(self) -> dict[str, float]:
        return scores(self.before, self.after)




def load_recipes(path: Path = RECIPES) -> dict[str, dict[str, Any]]:
    import yaml

    recipes = yaml.safe_load(path.read_text())
    for name, recipe in recipes.items():
        if not isinstance(recipe, dict) or "mmtuning" not in recipe:
            raise MMTuningError(f"{path}: arm '{name}' needs an `mmtuning:` block.")
    return recipes


Event = Callable[..., None]


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def check_out_dir(out: Path) -> None:
    """Never overwrite a user's files: `--out` must be new, empty, or a previous demo's output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RESULTS).is_file())):
        raise MMTuningError(f"--out {out}: exists and is not an earlier demo's output (no {RESULTS} in it); "
                            f"pass a new or empty directory.")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise MMTuningError(f"--out {out}: {blocking} is a file, not a directory; choose an --out inside a directory.")


@dataclass
class EvalSets:
    target: list[Encoded]
    general: list[Encoded]

    def measure(self, model, tokenizer) -> dict[str, Any]:
        """Accuracy on each set, and per question type (`by_question`: which skills were kept)."""
        from ..scoring import accuracy_by_kind

        predictions = {name: predict(model, tokenizer, rows) for name, rows in (("target", self.target),
                                                                                 ("general", self.general))}
        rows = self.target + self.general
        flat = predictions["target"] + predictions["general"]
        return {"target": accuracy(predictions["target"], self.target),
                "general": accuracy(predictions["general"], self.general),
                "by_question": accuracy_by_kind(flat, [r.answer for r in rows], [r.kind for r in rows])}


def load_processor(model_dir: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    processor.tokenizer.padding_side = "left"
    return processor


def load_base(model_dir: Path, session, four_bit: bool):
    """The embedded model, 4-bit NF4 unless disabled; the session's quantization policy wins when it has one.
    4-bit matmuls always compute in float32 here, like the rest of the demo: a recipe's `compute_dtype`
    (bfloat16 by default, right on a GPU) runs about 8x slower on CPUs without bf16 instructions."""
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if four_bit:
        policy = session.bnb_config_kwargs(AutoConfig.from_pretrained(str(model_dir)))
        bnb = policy or {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": ["lm_head"]}
        bnb = {**bnb, "bnb_4bit_compute_dtype": torch.float32}
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
    keep_cpu_4bit_layout(model)  # the demo scores mid-training (eval mode, no grad)
    return model


def curve_steps(steps: int, points: int) -> list[int]:
    points = max(2, min(points, steps + 1))
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


def run_arm(name: str, recipe: dict[str, Any], settings: DemoSettings, train: list[Encoded], sets: EvalSets,
            processor, on_event: Event) -> ArmResult:
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from ..integrations.hf import MMTuningTrainer, first_batches
    from ..session import MMTuning

    started = time.time()
    block = recipe["mmtuning"]
    session = MMTuning(block, where=f"{name}.mmtuning")
    torch.manual_seed(settings.seed)
    collate = lambda rows: training_batch(rows, processor.tokenizer.pad_token_id)  # noqa: E731
    probe = first_batches(train, collate, settings.batch_size) if session.needs_probe() else None  # layers: auto, init: corda
    model = session.wrap(load_base(settings.model_dir, session, settings.four_bit), probe_batches=probe,
                         seed=settings.seed)
    tokenizer = processor.tokenizer
    checkpoints = curve_steps(settings.steps, settings.curve_points)
    result = ArmResult(name, recipe.get("label", name), block, session.plan.trainable_params() or 0,
                       before={}, after={})

    eval_clock = [0.0, 0.0]  # wall, CPU seconds spent evaluating

    def measure(step: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        accuracies = sets.measure(model, tokenizer)
        eval_clock[0] += time.perf_counter() - wall
        eval_clock[1] += time.process_time() - cpu
        result.curve.append({"step": step, **accuracies})
        on_event("eval", name, step, accuracies)

    measure(0)
    result.before = dict(result.curve[0]); result.before.pop("step")

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if session.keep is not None:  # keep rows and base answers were built just before this
                result.keep = session.keep.report
                on_event("keep", name, result.keep)

        def on_step_end(self, args, state, control, **kwargs):
            on_event("step", name, state.global_step)
            if state.global_step in checkpoints and state.global_step < settings.steps:
                measure(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                result.loss.append((state.global_step, float(logs["loss"])))

    with tempfile.TemporaryDirectory(prefix="mmtune-demo-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr, lr_scheduler_type="linear", warmup_steps=max(1, settings.steps // 10),
            weight_decay=0.0, logging_steps=max(1, settings.steps // 30), save_strategy="no", report_to="none",
            use_cpu=True, seed=settings.seed, data_seed=settings.seed, disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0,
        )
        trainer = MMTuningTrainer(model=model, args=args, train_dataset=train, mmtuning=session, processing_class=processor,
                                  data_collator=collate,
                                  callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)  # the demo draws its own progress bar
        on_event("start", name, settings.steps)
        before_eval, wall, cpu = list(eval_clock), time.perf_counter(), time.process_time()
        trainer.train()
        result.step_seconds = (time.perf_counter() - wall - (eval_clock[0] - before_eval[0])) / settings.steps
        result.step_cpu_seconds = (time.process_time() - cpu - (eval_clock[1] - before_eval[1])) / settings.steps
    measure(settings.steps)
    result.after = dict(result.curve[-1]); result.after.pop("step")
    adapter = settings.out / name / "adapter"
    model.save_pretrained(str(adapter))
    result.adapter = str(adapter)
    result.seconds = time.time() - started
    on_event("done", name, result)
    return result


def eval_sets(processor, items: int) -> EvalSets:
    """Held-out items, the same for every seed and arm (seed 0 of the eval split, disjoint from training)."""
    return EvalSets(target=encode(processor, make_set("target", "eval", items, seed=0)),
                    general=encode(processor, make_set("general", "eval", items, seed=0)))


def demo_data(settings: DemoSettings) -> tuple[Any, EvalSets, list[Encoded]]:
    """The processor, the held-out sets and the seed's training stream: the same for every arm."""
    processor = load_processor(settings.model_dir)
    train = encode(processor, make_set("target", "train", settings.steps * settings.batch_size, seed=settings.seed))
    return processor, eval_sets(processor, settings.eval_items), train


def parallel_jobs(settings: DemoSettings) -> int:
    import os

    return min(settings.jobs or (os.cpu_count() or 1) // settings.threads or 1, len(settings.arms))


def run_arms_in_processes(settings: DemoSettings, recipes: dict[str, dict[str, Any]], on_event: Event) -> list[ArmResult]:
    """One process per arm, so a 2-core machine trains both arms at once. Each process rebuilds the same
    data and seeds itself as the sequential path does, so the numbers do not depend on `jobs`; its events
    come back through a queue and reach `on_event` in this process (the progress bars)."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # fork after torch/OpenMP start-up can hang the child
    events = context.Queue()

    def forward_events() -> None:
        for event in iter(events.get, None):
            on_event(*event)

    forwarder = threading.Thread(target=forward_events, daemon=True)
    forwarder.start()
    try:
        with ProcessPoolExecutor(parallel_jobs(settings), mp_context=context, initializer=_arm_process_start,
                                 initargs=(events,)) as pool:
            futures = [pool.submit(_arm_process, arm, recipes[arm], settings) for arm in settings.arms]
            return [future.result() for future in futures]
    finally:
        events.put(None)
        forwarder.join()


_events = None  # in an arm's process: the queue its events go back through


def _arm_process_start(events) -> None:
    import warnings

    global _events
    _events = events
    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_libraries()


def _arm_process(name: str, recipe: dict[str, Any], settings: DemoSettings) -> ArmResult:
    torch.set_num_threads(settings.threads)
    processor, sets, train = demo_data(settings)
    return run_arm(name, recipe, settings, train, sets, processor, lambda *event: _events.put(event))


def run_demo(settings: DemoSettings, on_event: Event | None = None,
             recipes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Both arms, the E/F/O table's numbers, adapters, results.json and the plot under `settings.out`.
    `recipes` replaces recipes.yaml (benchmarks compare variants of an arm)."""
    on_event = on_event or (lambda *args: None)
    check_out_dir(settings.out)
    _quiet_libraries()
    recipes = recipes or load_recipes()
    unknown = [arm for arm in settings.arms if arm not in recipes]
    if unknown:
        raise MMTuningError(f"unknown demo arm(s) {unknown}; recipes.yaml defines {list(recipes)}.")
    started = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
        if parallel_jobs(settings) > 1:
            arms = run_arms_in_processes(settings, recipes, on_event)
        else:
            processor, sets, train = demo_data(settings)
            arms = [run_arm(arm, recipes[arm], settings, train, sets, processor, on_event) for arm in settings.arms]
    finally:
        torch.set_num_threads(old_threads)
    from .plot import plot_curves

    report = {
        "seed": settings.seed,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "eval": {"target_items": settings.eval_items, "general_items": settings.eval_items,
                 "method": "greedy generation, exact match, held-out items"},
        "arms": {a.name: {**{k: v for k, v in asdict(a).items() if k != "name"}, **a.scores} for a in arms},
        "seconds": time.time() - started,
    }
    report["plot"] = str(plot_curves(report, settings.out / PLOT))
    (settings.out / RESULTS).write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_adapter(adapter: Path, model_dir: Path = MODEL_DIR, items: int = 128, four_bit: bool = True) -> dict[str, float]:
    """Accuracy of a saved demo adapter on the held-out sets (what the demo reports as `after`)."""
    from peft import PeftModel

    from ..methods import register_peft_methods
    from ..session import MMTuning

    _quiet_libraries()
    register_peft_methods()  # adapters of mmtuning's own PEFT methods (moe-lora, adapter, a tailored delta)
    processor = load_processor(model_dir)
    model = PeftModel.from_pretrained(load_base(model_dir, MMTuning({}), four_bit), str(adapter))
    return eval_sets(processor, items).measure(model, processor.tokenizer)
