"""`MMTuning`: one run's mmtuning state, the single object every host integration talks to, and the host
contract: the phases (`PHASES`) every host calls, in this order, through the session's methods.

A host creates it from the `mmtuning:` block (with its own LoRA keys as defaults), hands it the loaded model,
lets it wrap or verify, mixes its trainer pieces (optimizer groups, loss terms, callbacks, keep rows) into the
host's trainer, and the session's callbacks write the run report. Each feature (quantization, schedules,
alignment losses, keep) adds its piece here, so hosts stay thin and nothing is written twice. The session records
the phases it went through (`phases`), and the run report shows them, so a host that skips one is visible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from .config import MMTuningConfig, load_config
from .errors import MMTuningError
from .host_settings import (KBIT_ONLY, TRAINER, HostKeys, kbit_settings_not_applied, quant_conflicts, refuse,
                            with_host_defaults)
from .losses import CONTAINER as LOSS_CONTAINER
from .losses import LossSuite
from .names import modality_of_parameter, module_of
from .targets import TargetPlan, apply_plan, plan_targets, verify_wrapped


@dataclass(frozen=True)
class Phase:
    name: str
    what: str
    calls: str


# The host contract. Every host calls these, in this order; a host file holds only its key table and the hook
# where each phase runs (docs/architecture.md, "The host contract").
PHASES: tuple[Phase, ...] = (
    Phase("settings", "read the `mmtuning:` block with the host's own LoRA keys as its defaults; refuse, in one "
          "message, contradictions and every setting this host could not honour", "MMTuning.for_host"),
    Phase("load", "the `quant:` policy as the loader's BitsAndBytesConfig kwargs, before any weight loads",
          "MMTuning.bnb_config_kwargs / loader_kwargs"),
    Phase("loaded", "on the loaded model: plan on its real module names, verify the quantization against `quant:`, "
          "k-bit preparation where mmtuning prepares the model (the Trainer), refuse training a packed module whole",
          "MMTuning.after_load"),
    Phase("adapters", "PEFT wraps exactly the plan, or a model the host wrapped from the plan is checked against it",
          "MMTuning.wrap / verify"),
    Phase("trainer", "before the first step: the adapters still train exactly as planned and keep rows are built; "
          "during training: per-modality optimizer groups, extra loss terms, schedule and loss callbacks",
          "MMTuning.before_training (MMTuningTrainerMixin), optimizer_groups, extra_losses, callbacks"),
    Phase("report", "mmtuning_report.json in output_dir when training starts and when it ends, written atomically",
          "the report callback in MMTuning.callbacks"),
)
PHASE_NAMES = tuple(phase.name for phase in PHASES)


class MMTuning:
    def __init__(self, config: Any = None, where: str = "mmtuning", host: HostKeys = TRAINER):
        self.config: MMTuningConfig = load_config(config, where)
        self.host = host
        self.block = config  # as written, with the host's defaults filled in by `for_host`
        self.phases: list[str] = ["settings"]
        self.quant_verified = False
        self.kbit: dict[str, Any] | None = None  # what k-bit preparation did (Trainer host)
        self.log: Callable[[str], None] = _default_log
        self.plan: TargetPlan | None = None
        self._planned_on: int | None = None
        self._planned_ahead = False  # plan_ahead's every-layer stand-in for a `layers: auto` plan
        self.init_batches: list | None = None  # the first training batches, held for `init: corda`
        self.sharding: dict[str, Any] | None = None  # what FSDP sharded (sharding.shard), for the run report
        self.losses = LossSuite(self.config.losses)
        self.keep = None
        if self.config.keep is not None:  # reads keep files now: bad keep input fails before weights load
            from .keep import Keep

            self.keep = Keep(self.config.keep, f"{where}.keep")
        self.keep_template: dict[str, Any] = {}  # a host's processor / chat template / render for keep rows

    # --- settings (phase 1) ----------------------------------------------------------------------------

    @classmethod
    def for_host(cls, block: Any, settings: Mapping[str, Any], host: HostKeys, *, where: str = "mmtuning",
                 source: str = "the YAML", quant_bits: int | None = None, problems: list[str] = (),
                 checks: Callable[["MMTuning"], list[str]] | None = None) -> "MMTuning":
        """The session of a host run: the host's LoRA keys as the block's defaults; contradictions, settings the
        host cannot honour (k-bit preparation, a `quant:` policy the host's loading does not match) and the host's
        own `problems` (and those its `checks(session)` finds) refused together in one message naming `source`."""
        conflicts: list[str] = []
        block = with_host_defaults(block, settings, host, conflicts)
        session = cls(block, where=where, host=host)
        session.block = block
        conflicts += list(problems) + kbit_settings_not_applied(session.config, host)
        conflicts += quant_conflicts(session.config, host, quant_bits)
        conflicts += checks(session) if checks is not None else []
        refuse(conflicts, source, host.host)
        return session

    def enter(self, phase: str) -> None:
        """Record that this run reached `phase` (each once, in the order the host called them)."""
        if phase not in PHASE_NAMES:
            raise MMTuningError(f"unknown host contract phase {phase!r}; phases: {', '.join(PHASE_NAMES)}")
        if phase not in self.phases:
            self.phases.append(phase)

    # --- load and loaded (phases 2, 3) -----------------------------------------------------------------

    def loader_kwargs(self, model_config: Any) -> dict[str, Any]:
        """`from_pretrained` kwargs for the `quant:` policy: `{quantization_config: BitsAndBytesConfig}`, or {}."""
        kwargs = self.bnb_config_kwargs(model_config)
        if not kwargs:
            return {}
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(**kwargs)}

    def after_load(self, model: nn.Module, probe_batches: Any = None, seed: int = 0, log: Any = None) -> TargetPlan:
        """The loaded (not yet wrapped) model: plan on its real names (probing `probe_batches` under `layers: auto`;
        without them every layer stands in until `wrap` gets them), check its quantization against `quant:`, run
        mmtuning's k-bit preparation where the host leaves it to mmtuning, refuse `full` training of packed modules."""
        self.enter("loaded")
        if self.needs_probe() and probe_batches is None:
            plan = self.plan_ahead(model)
        else:
            plan = self.plan_for(model, probe_batches, seed, log)
        if self.config.quant is not None:
            self.verify_quantized(model)
            self.quant_verified = True
            self.log(f"quantized exactly as the `quant:` policy says ({self.config.quant.preset or 'custom'})")
        if plan.modules_to_save:
            from .quant import check_modules_to_save

            check_modules_to_save(model, plan.modules_to_save)
        if self.host.applies_kbit and self.wants_kbit():
            self.kbit = self.prepare_kbit_training(model)
        return plan

    def wants_kbit(self) -> bool:
        """k-bit preparation runs when a k-bit setting (checkpointing, fp32_norms, upcast_16bit) is written
        explicitly: its fp32 norms break models that feed a norm's output to 16-bit layers (BLIP-2's Q-Former)."""
        quant = self.config.quant
        return quant is not None and bool(set(KBIT_ONLY) & quant.model_fields_set)

    # --- adapters (phase 4) ----------------------------------------------------------------------------

    def plan_for(self, model: nn.Module, probe_batches: Any = None, seed: int = 0, log: Any = None) -> TargetPlan:
        """The exact plan for `model`. Under `layers: auto` the probe (probe.py) first scores the layers on
        `probe_batches` (the first collated training batches, labels included) on this unwrapped model."""
        from .probe import plan_with_probe

        self.plan = plan_with_probe(model, self.config, self.hold_batches(probe_batches), seed, log)
        self._planned_on = id(model)
        self._planned_ahead = False
        return self.plan

    def plan_ahead(self, model: nn.Module) -> TargetPlan:
        """A plan before any data exists (a host's meta skeleton, or `after_load` before the probe's batches):
        `layers: auto` modalities take every layer here, and plan_for with the probe's batches replaces it before
        wrapping."""
        from .probe import plan_unprobed

        self.plan = plan_unprobed(model, self.config)
        self._planned_on = id(model)
        self._planned_ahead = self.needs_probe()
        return self.plan

    def needs_probe(self) -> bool:
        """True when training batches are needed before the model can be wrapped: `layers: auto` (the probe) or an
        init that reads data (`init: corda`)."""
        from .probe import auto_modalities

        return bool(auto_modalities(self.config)) or bool(self.config.inits_from_data())

    def hold_batches(self, batches: Any) -> Any:
        """The first training batches, read once and held when a data-reading init needs them at wrap time (the
        probe may read them first, and a host's batches are a generator); otherwise `batches` as given. Every plan
        goes through `plan_for`, which holds them, before `wrap` passes them on."""
        if not self.config.inits_from_data():
            return batches
        if self.init_batches is None and batches is not None:
            from .probe import auto_modalities

            wanted = max([self.config.init_batches] + [self.config.spec(m).layers.auto.batches
                                                       for m in auto_modalities(self.config)])
            self.init_batches = list(itertools.islice(iter(batches), wanted))
        return self.init_batches

    def wrap(self, model: nn.Module, adapter_name: str = "default", probe_batches: Any = None, seed: int = 0,
             **peft_overrides: Any):
        """Plan (unless `after_load` just planned this model exactly; probing `probe_batches` under `layers: auto`),
        wrap with PEFT and verify: the PeftModel a trainer should train."""
        self.enter("adapters")
        planned = self.plan is not None and self._planned_on == id(model) and not self._planned_ahead
        plan = self.plan if planned else self.plan_for(model, probe_batches, seed)
        if plan.modules_to_save:
            from .quant import check_modules_to_save

            check_modules_to_save(model, plan.modules_to_save)
        wrapped = apply_plan(model, plan, adapter_name, calibration=self.init_batches, **peft_overrides)
        self.attach(wrapped)
        return wrapped

    def verify(self, model: nn.Module, adapter_name: str = "default") -> None:
        """Check a model a host wrapped itself (from `peft_config(plan)`) against the plan, then attach."""
        self.enter("adapters")
        from .selective.runtime import settle_selected

        settle_selected(model, self.require_plan())  # a host's PEFT trains modules_to_save copies whole
        verify_wrapped(model, self.require_plan(), adapter_name)
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Attach what runs inside the model's forward (loss feature hooks); `detach` removes it. The model's
        4-bit layers keep their trainable CPU layout from here on (an evaluation loop runs them in eval mode
        without grad: see base_view)."""
        from .base_view import keep_cpu_4bit_layout

        keep_cpu_4bit_layout(model)
        record_base_path(model)
        self.losses.attach(model)
        if self.keep is not None:
            if self.plan is not None:
                self.keep.check_plan(self.plan)
            self.keep.capture = self.losses.capture  # loss hooks pause during keep forwards

    def detach(self) -> None:
        self.losses.detach()

    def require_plan(self) -> TargetPlan:
        if self.plan is None:
            raise MMTuningError("mmtuning has no target plan yet: call plan_for(model) or wrap(model) first.")
        return self.plan

    # --- quantization (mmtuning_plugin/quant/) ------------------------------------------------------

    def bnb_config_kwargs(self, model_config: Any) -> dict[str, Any] | None:
        """kwargs for transformers.BitsAndBytesConfig under `quant:`; None when no policy is set (phase `load`)."""
        from .quant import bnb_config_kwargs

        self.enter("load")
        return bnb_config_kwargs(self.config, model_config)

    def verify_quantized(self, model: nn.Module) -> dict[str, Any]:
        """Which modules of a loaded model are 4-bit, per modality; raises if that differs from `quant:`."""
        from .quant import verify_quantized

        return verify_quantized(model, self.config)

    def prepare_kbit_training(self, model: nn.Module) -> dict[str, Any]:
        """k-bit preparation that keeps frozen 16-bit towers 16-bit (use instead of PEFT's)."""
        from .quant import prepare_kbit_training

        return prepare_kbit_training(model, self.config)

    # --- trainer (phase 5) ------------------------------------------------------------------------------

    def before_training(self, model: nn.Module) -> None:
        """Right before the first step, after every host option had its say: PEFT's wrapping still equals the plan
        and exactly the planned adapters train (a host's freezing options can change that)."""
        self.enter("trainer")
        plan = self.require_plan()
        verify_wrapped(model, plan)
        check_trainable(model, plan, self.host, static=self.schedule().is_static())

    def optimizer_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: every trainable or adapter parameter, once, in its modality's
        group (`vision`, `projector`, `language`, `other`; `vision.layer3` with lr_decay) at lr x the
        modality's `lr` multiplier. Adapters of later schedule stages are in from step 0."""
        from .schedules import optimizer_groups

        return optimizer_groups(model, self.require_plan(), lr, weight_decay)

    def schedule(self):
        """The resolved layer schedule (`SchedulePlan`): which layers train at step N."""
        from .schedules import schedule_plan

        return schedule_plan(self.require_plan())

    def callbacks(self) -> list[Any]:
        """transformers TrainerCallbacks this run needs: the layer schedule (a no-op stage for static runs), SPIDER's
        update mask, calibrated inits' frozen halves, losses, keep, and the run report (phase 6)."""
        from .methods.inits import init_callback  # a no-op unless a modality uses a calibrated `init`
        from .schedules import schedule_callback
        from .selective.spider import spider_callback  # a no-op unless a modality uses `selective: spider`

        return [schedule_callback(self), spider_callback(self), init_callback(self), *self.losses.callbacks(),
                *([self.keep.callback()] if self.keep else []), report_callback(self)]

    def extra_losses(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, Any]:
        """Named loss terms to add to the task loss (alignment, regularizers); empty when none configured.

        Call right after the model's forward on `inputs`: the terms read features its hooks captured. The keep
        term (`loss_keep`) runs its own forwards after that."""
        terms = self.losses.compute(inputs)
        if self.keep is not None:
            from .keep import LOG_KEY

            value = self.keep.term(model, inputs, outputs)
            if value is not None:
                terms[LOG_KEY] = value
        return terms

    # --- keep (mmtuning_plugin/keep) ---------------------------------------------------------------

    def fuse_keep(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Call before the model's forward on `inputs`: under `keep.fuse` the batch to run instead (the keep rows
        appended); hand that batch to `extra_losses` too. `inputs` itself otherwise."""
        return inputs if self.keep is None else self.keep.fuse(model, inputs)

    def unfuse_keep(self, error: BaseException) -> None:
        """The fused forward raised: run the original batch again; keep rows get their own forward from now on."""
        self.keep.unfuse(error)

    def use_keep_template(self, processor: Any = None, chat_template: str | None = None, render: Any = None,
                          log: Any = None) -> None:
        """A host hands over what writes its prompts: its processor (tokenizer + image processor), and its chat
        template (a jinja string) or `render(messages) -> text` when its templating is its own; `log(line)` shows
        the keep report where the host's own log lines go."""
        self.keep_template = {k: v for k, v in (("processor", processor), ("chat_template", chat_template),
                                                ("render", render), ("log", log)) if v is not None}

    def prepare_keep(self, model: nn.Module, processor: Any = None, *, training_batches: Any = None,
                     total_steps: int | None = None, log: Any = None, **template: Any) -> dict[str, Any] | None:
        """Before training: build keep rows with the run's processor and template, generate the base's answers
        where needed and log what will be kept. `training_batches`: collated training batches (their images are
        the keep images under `images: train`). None without `keep:`."""
        if self.keep is None:
            return None
        given = {**self.keep_template, **{k: v for k, v in template.items() if v is not None}}
        processor = processor if processor is not None else given.pop("processor", None)
        given.pop("processor", None)
        log = log or given.pop("log", None)
        given.pop("log", None)
        if processor is None:
            raise MMTuningError(f"{self.keep.where}: keep rows need the run's processor (tokenizer, image processor, "
                                f"chat template); pass it to the trainer as `MMTuningTrainer(..., "
                                f"processing_class=processor)`, or hand it over with "
                                f"`session.use_keep_template(processor)` before training.")
        return self.keep.prepare(model, processor, training_batches=training_batches, total_steps=total_steps,
                                 log=log, **given)



def record_base_path(model: nn.Module) -> None:
    """A base loaded from a relative directory is recorded with its absolute path in the adapter's config, so the
    saved adapter finds its base (`mmtune eval`, `mmtune convert`) from any working directory."""
    import os

    for config in (getattr(model, "peft_config", None) or {}).values():
        name = getattr(config, "base_model_name_or_path", None)
        if isinstance(name, str) and name and not os.path.isabs(name) and os.path.isdir(name):
            config.base_model_name_or_path = os.path.abspath(name)


def _default_log(line: str) -> None:
    import logging

    logging.getLogger("mmtuning").info(line)


def check_trainable(model: nn.Module, plan: TargetPlan, host: HostKeys = TRAINER, static: bool = True) -> None:
    """Every trainable parameter belongs to a planned adapter, and (before a layer schedule freezes any) every
    planned adapter trains."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    outside = [name for name in trainable if modality_of_parameter(plan, name) is None
               and f"{LOSS_CONTAINER}." not in name]  # a loss's own parameters (a learnable temperature)
    problems = []
    if outside:
        problems.append(f"{len(outside)} trainable parameters outside the plan (e.g. {', '.join(outside[:3])})")
    if static:
        adapted = {module_of(n) for n in trainable if ".lora_" in n}
        frozen = [m.name for m in plan.modules if m.name not in adapted]
        frozen += [p.name for p in plan.parameters if p.name.rsplit(".", 1)[0] not in adapted and p.name not in adapted]
        if frozen and any(".lora_" in n for n in trainable):  # other methods name their weights differently
            problems.append(f"{len(frozen)} planned adapters are frozen (e.g. {', '.join(frozen[:3])})")
    if problems:
        raise MMTuningError(f"Before training, the trainable set no longer matches the mmtuning plan: "
                            + "; ".join(problems) + f". Check {host.freezing or 'what changed requires_grad'}: "
                            f"remove those options and let the `mmtuning:` block choose what trains.")


def report_callback(session: MMTuning) -> Any:
    """A transformers `TrainerCallback` writing `mmtuning_report.json` into output_dir when training starts (what
    trains: plan, quantization, optimizer groups) and again when it ends (imported lazily: core stays host-free)."""
    from transformers import TrainerCallback

    from .report import run_report, summary_line, write_report

    class MMTuningReportCallback(TrainerCallback):
        def write(self, args, state, model, optimizer, finished: bool) -> None:
            if model is None or not state.is_world_process_zero:
                return
            session.enter("report")
            total = state.max_steps if state.max_steps and state.max_steps > 0 else None
            report = run_report(session, model, optimizer, step=state.global_step, total_steps=total, finished=finished)
            path = write_report(args.output_dir, report)
            if not finished:
                session.log(summary_line(report, path))

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.write(args, state, model, optimizer, finished=False)

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.write(args, state, model, optimizer, finished=True)

    return MMTuningReportCallback()
