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
from .targets import TargetPlan, apply_plan, plan_targets, verify_wrapped


class MMTuning:
    def __init__(self, config: Any = None, where: str = "mmtuning"):
        self.config: MMTuningConfig = load_config(config, where)
        self.plan: TargetPlan | None = None

    # --- targets -----------------------------------------------------------------------------------

    def plan_for(self, model: nn.Module) -> TargetPlan:
        self.plan = plan_targets(model, self.config)
        return self.plan

    def wrap(self, model: nn.Module, adapter_name: str = "default", **peft_overrides: Any):
        """Plan, wrap with PEFT and verify: the PeftModel a trainer should train."""
        plan = self.plan_for(model)
        return apply_plan(model, plan, adapter_name, **peft_overrides)

    def verify(self, model: nn.Module, adapter_name: str = "default") -> None:
        """Check a model a host wrapped itself (from `peft_config(plan)`) against the plan."""
        verify_wrapped(model, self.require_plan(), adapter_name)

    def require_plan(self) -> TargetPlan:
        if self.plan is None:
            raise MMTuningError("mmtuning has no target plan yet: call plan_for(model) or wrap(model) first.")
        return self.plan

    # --- training ----------------------------------------------------------------------------------

    def optimizer_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: every trainable or adapter parameter, once, in its modality's
        group (`vision`, `projector`, `language`, `other`; `vision.layer3` with lr_decay) at lr x the
        modality's `lr` multiplier. Adapters of later schedule stages are in from step 0."""
        from .schedule import optimizer_groups

        return optimizer_groups(model, self.require_plan(), lr, weight_decay)

    def schedule(self):
        """The resolved layer schedule (`SchedulePlan`): which layers train at step N."""
        from .schedule import schedule_plan

        return schedule_plan(self.require_plan())

    def callbacks(self) -> list[Any]:
        """transformers TrainerCallbacks this run needs: the layer schedule (a no-op stage for static runs)."""
        from .schedule import schedule_callback

        return [schedule_callback(self)]

    def extra_losses(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, Any]:
        """Named loss terms to add to the task loss (alignment, regularizers); empty when none configured."""
        return {}


def modality_of_parameter(plan: TargetPlan, parameter_name: str) -> str | None:
    """Modality of a trainable parameter name such as `base_model.model.<module>.lora_A.default.weight`."""
    name = parameter_name
    while name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for marker in (".lora_", ".hada_", ".lokr_", ".ia3_", ".modules_to_save."):
        if marker in name:
            name = name.split(marker)[0]
            break
    name = name.replace(".base_layer", "")
    found = plan.modality_of(name)
    if found:
        return found
    for parameter in plan.parameters:  # a ParamWrapper sits at the bare parameter's module
        if parameter.name.rsplit(".", 1)[0] == name:
            return parameter.modality
    if any(name == whole or name.startswith(whole + ".") for whole in plan.modules_to_save):
        return "projector"
    return None
