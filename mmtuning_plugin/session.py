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

    # --- targets -----------------------------------------------------------------------------------

    def plan_for(self, model: nn.Module) -> TargetPlan:
        self.plan = plan_targets(model, self.config)
        return self.plan

    def wrap(self, model: nn.Module, adapter_name: str = "default", **peft_overrides: Any):
        """Plan, wrap with PEFT and verify: the PeftModel a trainer should train."""
        plan = self.plan_for(model)
        if plan.modules_to_save:
            from .quant import check_modules_to_save

            check_modules_to_save(model, plan.modules_to_save)
        wrapped = apply_plan(model, plan, adapter_name, **peft_overrides)
        self.attach(wrapped)
        return wrapped

    def verify(self, model: nn.Module, adapter_name: str = "default") -> None:
        """Check a model a host wrapped itself (from `peft_config(plan)`) against the plan, then attach."""
        verify_wrapped(model, self.require_plan(), adapter_name)
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Attach what runs inside the model's forward (loss feature hooks); `detach` removes it."""
        self.losses.attach(model)

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
        """transformers TrainerCallbacks this run needs: the layer schedule (a no-op stage for static runs), losses."""
        from .schedules import schedule_callback

        return [schedule_callback(self), *self.losses.callbacks()]

    def extra_losses(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, Any]:
        """Named loss terms to add to the task loss (alignment, regularizers); empty when none configured.

        Call right after the model's forward on `inputs`: the terms read features its hooks captured."""
        return self.losses.compute(inputs)

