"""The built-in adapter methods, registered through the same pluggy hook a third-party package uses.

`lora`, `ia3`, `loha`, `lokr` are PEFT's own; `adapter` (bottleneck adapters) and `moe-lora` (modality-routed
LoRA experts) are mmtuning's, registered with PEFT in `bottleneck.py` and `moe_lora.py`.
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any, Literal, Optional

from pydantic import Field

from ..config import MethodOptions
from ..hookspecs import hookimpl
from . import inits
from .base import AdapterMethod, features


def _exact(plan: Any, value, default) -> dict[str, Any]:
    """Exact module name -> value(module) where it differs from the config's top-level `default` (exact names, not
    PEFT's regex patterns: mmtuning's own tuners look them up as they are)."""
    return {m.name: value(m) for m in plan.modules if value(m) != default}


class LoRA(AdapterMethod):
    summary = "low-rank delta B A per weight (PEFT LoRA; DoRA and rsLoRA through use_dora / use_rslora)"
    leaf_types = ("Linear", "Conv2d", "Conv3d", "Embedding")
    bare_parameters = True
    markers = (".lora_",)
    peft_type = "LORA"
    not_convertible = ""

    @classmethod
    def size(cls, leaf, r, config):
        return inits.size(config.init_of(leaf.modality), r)  # a calibrated start holds its frozen half too

    @classmethod
    def trainable(cls, leaf, r, config):
        in_features, out_features = features(leaf)
        return cls.size(leaf, r, config) * (in_features + out_features) + (out_features if config.use_dora else 0)

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from peft import LoraConfig

        config = plan.config
        ranks, alphas = dict(plan.rank_pattern), dict(plan.alpha_pattern)
        for key, item in plan._pattern_items():  # calibrated starts: rank 2r at the scaling of rank r
            size = inits.size(config.init_of(item.modality), item.r)
            if size != item.r:
                ranks[key] = size
                alphas[key] = item.alpha * (math.sqrt(size / item.r) if config.use_rslora else size / item.r)
        kwargs = dict(common, r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout,
                      use_dora=config.use_dora, use_rslora=config.use_rslora, rank_pattern=ranks,
                      alpha_pattern=alphas, target_parameters=plan.target_parameters or None)
        return LoraConfig(**{**kwargs, **overrides})


class IA3(AdapterMethod):
    summary = "a learned scale per output feature (PEFT IA3)"
    leaf_types = ("Linear", "Conv2d", "Conv3d")
    ranked = False
    markers = (".ia3_",)
    peft_type = "IA3"

    @classmethod
    def trainable(cls, leaf, r, config):
        return features(leaf)[1]

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from peft import IA3Config

        return IA3Config(**{**common, "feedforward_modules": [], **overrides})


class LoHa(AdapterMethod):
    summary = "low-rank Hadamard product delta (PEFT LoHa)"
    leaf_types = ("Linear", "Conv2d")
    markers = (".hada_",)
    peft_type = "LOHA"

    @classmethod
    def trainable(cls, leaf, r, config):
        return 2 * r * sum(features(leaf))

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from peft import LoHaConfig

        return LoHaConfig(**_lycoris(plan, common, overrides))


class LoKr(AdapterMethod):
    summary = "low-rank Kronecker product delta (PEFT LoKr)"
    leaf_types = ("Linear", "Conv2d")
    markers = (".lokr_",)
    peft_type = "LOKR"

    @classmethod
    def trainable(cls, leaf, r, config):
        return None  # factor shapes depend on PEFT's factorization of each weight

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from peft import LoKrConfig

        return LoKrConfig(**_lycoris(plan, common, overrides))


def _lycoris(plan, common, overrides) -> dict[str, Any]:
    return {**common, "r": plan.r, "alpha": plan.alpha, "rank_dropout": 0.0, "module_dropout": plan.dropout,
            "rank_pattern": plan.rank_pattern, "alpha_pattern": plan.alpha_pattern, **overrides}


class BottleneckOptions(MethodOptions):
    reduction: Optional[int] = Field(
        default=None, ge=1,
        description="Width = the block's output size / reduction (Houlsby adapters use 16 or so). Absent: the "
        "modality's `r` is the width.")
    nonlinearity: Literal["gelu", "relu", "silu", "tanh"] = Field(default="gelu", description="Between down and up.")


class Bottleneck(AdapterMethod):
    summary = ("bottleneck adapters after attention and MLP blocks: y + up(act(down(y))), width r or "
               "output/reduction (additive; cannot merge)")
    Options = BottleneckOptions
    markers = (".bottleneck_",)
    peft_type = "MMT_BOTTLENECK"
    not_convertible = ("a bottleneck adapter is nonlinear, so it has no LoRA delta to merge, export, resize or "
                       "combine; load it with PeftModel.from_pretrained after `import mmtuning_plugin.methods`")

    @classmethod
    def place(cls, leaves):
        """One adapter per block, after the block's output: per (layer, kind), the last Linear whose output size
        equals the block's input size (o_proj, down_proj, fc2, attn.proj); the projector's last Linear (its output
        is what the language model reads)."""
        placed = []
        for _, group in groupby(leaves, key=lambda leaf: (leaf.layer, leaf.kind)):
            group = list(group)
            width = features(group[0])[0]
            outputs = [leaf for leaf in group if features(leaf)[1] == width and leaf.kind != "projector"]
            placed.append((outputs or group)[-1])
        return placed

    @classmethod
    def width(cls, leaf, r, options: BottleneckOptions) -> int:
        return max(1, features(leaf)[1] // options.reduction) if options.reduction else r

    @classmethod
    def size(cls, leaf, r, config):
        return cls.width(leaf, r, config.method_options)

    @classmethod
    def trainable(cls, leaf, r, config):
        out_features = features(leaf)[1]
        width = cls.width(leaf, r, config.method_options)
        return 2 * width * out_features + width + out_features

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from .bottleneck import BottleneckConfig, register

        register()
        options = plan.config.method_options
        width = lambda m: cls.width(m.leaf, m.r, options)  # noqa: E731
        return BottleneckConfig(**{**common, "width": plan.r, "width_pattern": _exact(plan, width, plan.r),
                                   "nonlinearity": options.nonlinearity, "dropout": plan.dropout, **overrides})

    @classmethod
    def describe(cls, options):
        return {"width": f"output/{options.reduction}" if options.reduction else "r", "nonlinearity": options.nonlinearity,
                "placement": "after each selected block's output projection"}


class MoeLoraOptions(MethodOptions):
    experts: int = Field(default=4, ge=2, description="LoRA experts per adapted module (MMtuning used 4).")
    balance: float = Field(
        default=0.01, ge=0,
        description="Weight of the `moe_balance` load-balance term (0: not added). The `losses:` block may set "
        "`moe_balance` itself.")


class MoeLora(AdapterMethod):
    summary = ("LoRA experts per module, mixed per token by an image router or a text router (image tokens from "
               "the model's image placeholder positions); cannot merge")
    Options = MoeLoraOptions
    markers = (".moelora_",)
    peft_type = "MMT_MOELORA"
    not_convertible = ("MoE-LoRA mixes its experts per token, so no single LoRA delta exists to merge, export "
                       "(vLLM serves plain LoRA only), resize or combine; load it with PeftModel.from_pretrained after "
                       "`import mmtuning_plugin.methods`")

    @classmethod
    def default_losses(cls, options):
        return {"moe_balance": {"weight": options.balance}} if options.balance > 0 else {}

    @classmethod
    def trainable(cls, leaf, r, config):
        experts = config.method_options.experts
        in_features, out_features = features(leaf)
        return experts * r * (in_features + out_features) + 2 * (in_features * experts + experts)

    @classmethod
    def peft_config(cls, plan, common, overrides):
        from .moe_lora import MoeLoraConfig, register

        register()
        image = [m.name for m in plan.modules if m.modality != "language"]
        return MoeLoraConfig(**{**common, "r": plan.r, "lora_alpha": plan.alpha, "dropout": plan.dropout,
                                "rank_pattern": _exact(plan, lambda m: m.r, plan.r),
                                "alpha_pattern": _exact(plan, lambda m: m.alpha, plan.alpha),
                                "experts": plan.config.method_options.experts, "image_modules": image, **overrides})

    @classmethod
    def describe(cls, options):
        return {**options.model_dump(), "routers": ["image", "text"]}


BUILTIN_METHODS: dict[str, type[AdapterMethod]] = {
    "lora": LoRA, "ia3": IA3, "loha": LoHa, "lokr": LoKr, "adapter": Bottleneck, "moe-lora": MoeLora,
}


@hookimpl
def register_methods(register):
    for name, method_class in BUILTIN_METHODS.items():
        register(name, method_class)
