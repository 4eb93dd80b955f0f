"""`MMTuning`: one run's mmtuning state, the single object every host integration talks to.

A host creates it from the `mmtuning:` block, asks it to wrap the model, and at the right hooks asks it
for optimizer parameter groups, trainer callbacks and extra loss terms. Each feature (quantization,
schedules, alignment losses) adds its piece here, so hosts stay thin and nothing is written twice.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import MMTuningConfig, load_config
from .errors import MMTuningError
from .losses import LossSuite
from .targets import TargetPlan, apply_plan, plan_targets, verify_wrapped


class MMTuning:
    def __init__(self, config: Any = None, where: str = "mmtuning"):
        self.config: MMTuningConfig = load_config(config, where)
        self.plan: TargetPlan | None = None
        self.losses = LossSuite(self.config.losses)
        self.keep = None
        if self.config.keep is not None:  # reads keep files now: bad keep input fails before weights load
            from .keep import Keep

            self.keep = Keep(self.config.keep, f"{where}.keep")
        self.keep_template: dict[str, Any] = {}  # a host's processor / chat template / render for keep rows

    # --- targets -----------------------------------------------------------------------------------

    def plan_for(self, model: nn.Module, probe_batches: Any = None, seed: int = 0, log: Any = None) -> TargetPlan:
        """The exact plan for `model`. Under `layers: auto` the probe (probe.py) first scores the layers on
        `probe_batches` (the first collated training batches, labels included) on this unwrapped model."""
        from .probe import plan_with_probe

        self.plan = plan_with_probe(model, self.config, probe_batches, seed, log)
        return self.plan

    def plan_ahead(self, model: nn.Module) -> TargetPlan:
        """A plan before any data exists (a host's meta skeleton): `layers: auto` modalities take every layer here,
        and plan_for with the probe's batches replaces it before wrapping."""
        from .probe import plan_unprobed

        self.plan = plan_unprobed(model, self.config)
        return self.plan

    def needs_probe(self) -> bool:
        """True when `layers: auto` asks for training batches before the model can be wrapped."""
        from .probe import auto_modalities

        return bool(auto_modalities(self.config))

    def wrap(self, model: nn.Module, adapter_name: str = "default", probe_batches: Any = None, seed: int = 0,
             **peft_overrides: Any):
        """Plan (probing `probe_batches` under `layers: auto`), wrap with PEFT and verify: the PeftModel a trainer
        should train."""
        plan = self.plan_for(model, probe_batches, seed)
        if plan.modules_to_save:
            from .quant import check_modules_to_save

            check_modules_to_save(model, plan.modules_to_save)
        wrapped = apply_plan(model, plan, adapter_name, **peft_overrides)
        self.attach(wrapped)
        return wrapped

    def verify(self, model: nn.Module, adapter_name: str = "default") -> None:
        """Check a model a host wrapped itself (from `peft_config(plan)`) against the plan, then attach."""
        from .selective.runtime import settle_selected

        settle_selected(model, self.require_plan())  # a host's PEFT trains modules_to_save copies whole
        verify_wrapped(model, self.require_plan(), adapter_name)
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Attach what runs inside the model's forward (loss feature hooks); `detach` removes it."""
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
        """kwargs for transformers.BitsAndBytesConfig under `quant:`; None when no policy is set."""
        from .quant import bnb_config_kwargs

        return bnb_config_kwargs(self.config, model_config)

    def verify_quantized(self, model: nn.Module) -> dict[str, Any]:
        """Which modules of a loaded model are 4-bit, per modality; raises if that differs from `quant:`."""
        from .quant import verify_quantized

        return verify_quantized(model, self.config)

    def prepare_kbit_training(self, model: nn.Module) -> dict[str, Any]:
        """k-bit preparation that keeps frozen 16-bit towers 16-bit (use instead of PEFT's)."""
        from .quant import prepare_kbit_training

        return prepare_kbit_training(model, self.config)

    # --- training ----------------------------------------------------------------------------------

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
        update mask, losses."""
        from .schedules import schedule_callback
        from .selective.spider import spider_callback  # a no-op unless a modality uses `selective: spider`

        return [schedule_callback(self), spider_callback(self), *self.losses.callbacks(),
                *([self.keep.callback()] if self.keep else [])]

    def extra_losses(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, Any]:
        """Named loss terms to add to the task loss (alignment, regularizers); empty when none configured.

        Call right after the model's forward on `inputs`: the terms read features its hooks captured. The keep
        term (`loss_keep`) runs its own forwards after that."""
        terms = self.losses.compute(inputs)
        if self.keep is not None:
            from .keep import LOG_KEY

            value = self.keep.term(model, inputs)
            if value is not None:
                terms[LOG_KEY] = value
        return terms

    # --- keep (mmtuning_plugin/keep) ---------------------------------------------------------------

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
                                f"chat template); hand it over with MMTuning.use_keep_template(processor).")
        return self.keep.prepare(model, processor, training_batches=training_batches, total_steps=total_steps,
                                 log=log, **given)

