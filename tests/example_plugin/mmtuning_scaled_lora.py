"""A third-party adapter method package: registers `scaled-lora`, LoRA whose scaling is `scale` times alpha / r
(a one-option method: the block writes `method: {name: scaled-lora, scale: 2}`)."""

from pydantic import Field

import mmtuning_plugin
from mmtuning_plugin.config import MethodOptions
from mmtuning_plugin.methods.builtin import LoRA


class ScaledLoRAOptions(MethodOptions):
    scale: float = Field(default=2.0, gt=0, description="Multiplier of every module's alpha.")


class ScaledLoRA(LoRA):
    summary = "LoRA with every alpha multiplied by `scale`"
    Options = ScaledLoRAOptions

    @classmethod
    def peft_config(cls, plan, common, overrides):
        scale = plan.config.method_options.scale
        alphas = {name: alpha * scale for name, alpha in plan.alpha_pattern.items()}
        return super().peft_config(plan, common, {"lora_alpha": plan.alpha * scale, "alpha_pattern": alphas,
                                                  **overrides})


@mmtuning_plugin.hookimpl
def register_methods(register):
    register("scaled-lora", ScaledLoRA)
