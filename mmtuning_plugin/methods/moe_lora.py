"""MoE-LoRA as a PEFT method: several LoRA experts per adapted Linear, mixed per token by a router of the token's
modality (the seed repo's tuner, done from the modality map instead of a fixed position).

Per token: `y = W x + scale * sum_e g_e(x) * B_e A_e x`, with `g = softmax(router_m(x))` and `m` the token's
modality. Vision-tower and projector modules see image tokens only (their `image_modules`); in the language model
a token is an image token where `input_ids == image_token_id`, read by a forward pre-hook on the model, so it
holds for any number and place of images (never a fixed position). Tokens of another sequence than input_ids'
(the decoder of an encoder-decoder language model) and the language tokens of cross-attention models (Mllama),
which hold no image placeholder, route as text. Every expert is computed (soft routing, as MMtuning
did); the load-balance statistic of each layer's last training forward feeds the `moe_balance` loss.
Routing depends on the input, so there is no single weight delta: it cannot merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .peft_types import register_with_peft
from .tuner import ExactTargetsConfig, LinearAdapterLayer, LinearTuner

PEFT_NAME, PREFIX = "mmt_moelora", "moelora_"


@dataclass
class MoeLoraConfig(ExactTargetsConfig):
    """PEFT config of mmtuning's modality-routed mixture of LoRA experts (peft_type MMT_MOELORA)."""

    peft_name = PEFT_NAME

    r: int = field(default=8, metadata={"help": "Rank of each expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling alpha / r, as LoRA."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Exact module name -> rank."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Exact module name -> alpha."})
    experts: int = field(default=4, metadata={"help": "LoRA experts per module."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    image_modules: list = field(default_factory=list, metadata={"help": "Modules whose tokens are all image "
                                                                        "tokens (vision tower, projector)."})
    image_token_id: Optional[int] = field(default=None, metadata={"help": "Image placeholder id in input_ids; "
                                                                          "None: read from the model config."})

    def __post_init__(self):
        super().__post_init__()
        if self.experts < 1:
            raise ValueError(f"experts: {self.experts}; write 1 or more")


class TokenModality:
    """Which tokens of the current forward are image tokens (`input_ids == image_token_id`), shared by a model's
    MoE-LoRA layers and refreshed by a forward pre-hook on every call of the model."""

    def __init__(self, image_token_id: int | None):
        self.image_token_id = image_token_id
        self.image_mask: torch.Tensor | None = None

    def read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
            ids = args[0]
        self.image_mask = None if ids is None or self.image_token_id is None else ids == self.image_token_id


class MoeLoraLayer(LinearAdapterLayer):
    adapter_layer_names = ("moelora_A", "moelora_B", "moelora_router_image", "moelora_router_text")
    other_param_names = ("r", "lora_alpha", "scaling", "experts", "moelora_dropout")
    not_mergeable = ("MoE-LoRA mixes its experts per token by a router, so no single weight delta exists to merge; "
                     "keep it as an adapter (PeftModel.from_pretrained) or train method: lora to merge")

    def __init__(self, base_layer: nn.Module, routing: TokenModality, all_image: bool, **kwargs) -> None:
        self._wrap(base_layer)
        self.moelora_A = nn.ParameterDict({})
        self.moelora_B = nn.ParameterDict({})
        self.moelora_router_image = nn.ModuleDict({})
        self.moelora_router_text = nn.ModuleDict({})
        self.moelora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.experts: dict[str, int] = {}
        self.routing = routing
        self.all_image = all_image
        self.balance: torch.Tensor | None = None  # this layer's last load-balance statistic (training only)

    def update_layer(self, adapter_name: str, r: int, alpha: float, experts: int, dropout: float) -> None:
        self.r[adapter_name], self.lora_alpha[adapter_name], self.experts[adapter_name] = r, alpha, experts
        self.scaling[adapter_name] = alpha / r
        a = torch.empty(experts, r, self.in_features)
        for expert in a:  # each expert as LoRA's A: Kaiming-uniform
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        self.moelora_A[adapter_name] = nn.Parameter(a)
        self.moelora_B[adapter_name] = nn.Parameter(torch.zeros(experts, self.out_features, r))
        self.moelora_router_image[adapter_name] = nn.Linear(self.in_features, experts)
        self.moelora_router_text[adapter_name] = nn.Linear(self.in_features, experts)
        self.moelora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)


class MoeLoraLinear(nn.Module, MoeLoraLayer):
    """A Linear (16-bit, 4-bit or 8-bit) plus modality-routed LoRA experts."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, routing: TokenModality, all_image: bool,
                 r: int, alpha: float, experts: int, dropout: float):
        super().__init__()
        MoeLoraLayer.__init__(self, base_layer, routing, all_image)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, experts, dropout)

    def gates(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights: the image router on image tokens, the text router on the others."""
        if self.all_image:
            return torch.softmax(self.moelora_router_image[name](x), dim=-1)
        text = self.moelora_router_text[name](x)
        mask = self.routing.image_mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]) or not mask.any():
            return torch.softmax(text, dim=-1)  # a sequence other than input_ids' (a T5 decoder's) holds no image
        image = self.moelora_router_image[name](x)
        return torch.softmax(torch.where(mask.unsqueeze(-1), image, text), dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.moelora_A:
                continue
            a, b = self.moelora_A[name], self.moelora_B[name]
            experts, r = self.experts[name], self.r[name]
            inputs = self.moelora_dropout[name](x.to(a.dtype))
            gates = self.gates(name, inputs)  # (..., experts)
            low = (inputs @ a.reshape(experts * r, -1).T).unflatten(-1, (experts, r))  # (..., experts, r)
            mixed = (low * gates.unsqueeze(-1)).flatten(-2)  # (..., experts * r)
            delta = mixed @ b.permute(0, 2, 1).reshape(experts * r, -1)  # (..., out)
            result = result + (delta * self.scaling[name]).to(result.dtype)
            if self.training:
                self.balance = load_balance(gates)
        return result

    def __repr__(self) -> str:
        return "moelora." + super().__repr__()


def load_balance(gates: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance: experts x sum_e (share of tokens whose top expert is e) x (mean gate of e);
    1.0 when every expert gets the same share, up to `experts` when one takes every token."""
    flat = gates.reshape(-1, gates.shape[-1])
    share = nn.functional.one_hot(flat.argmax(-1), flat.shape[-1]).to(flat.dtype).mean(0)
    return flat.shape[-1] * (share * flat.mean(0)).sum()


class MoeLoraModel(LinearTuner):
    """PEFT tuner: MoE-LoRA layers on the targeted Linear modules, and the pre-hook that tells them which tokens
    are image tokens."""

    prefix: str = PREFIX
    tuner_layer_cls = MoeLoraLayer
    linear_class = MoeLoraLinear

    def _prepare_adapter_config(self, peft_config: MoeLoraConfig, model_config: dict) -> MoeLoraConfig:
        if peft_config.image_token_id is None:
            from ..arch import image_token_id

            try:  # saved in the adapter config, so a reload routes the same without the arch tables
                peft_config.image_token_id = image_token_id(self.model.config)
            except (ValueError, AttributeError):
                pass  # no image token in the text (cross-attention): language tokens route as text
        return peft_config

    def _routing(self, peft_config: MoeLoraConfig) -> TokenModality:
        routing = self.__dict__.get("_token_modality")
        if routing is None:
            routing = TokenModality(peft_config.image_token_id)
            self.__dict__["_token_modality"] = routing
            self.__dict__["_routing_hook"] = self.model.register_forward_pre_hook(routing.read, with_kwargs=True)
        return routing

    def layer_settings(self, peft_config: MoeLoraConfig, current_key: str) -> dict:
        return dict(r=peft_config.rank_pattern.get(current_key, peft_config.r),
                    alpha=peft_config.alpha_pattern.get(current_key, peft_config.lora_alpha),
                    experts=peft_config.experts, dropout=peft_config.dropout)

    def extra_layer_arguments(self, peft_config: MoeLoraConfig, current_key: str) -> dict:
        return {"routing": self._routing(peft_config), "all_image": current_key in peft_config.image_modules}


def moe_layers(model: nn.Module) -> list[MoeLoraLinear]:
    return [module for module in model.modules() if isinstance(module, MoeLoraLinear)]


def register() -> None:
    register_with_peft(PEFT_NAME, MoeLoraConfig, MoeLoraModel, PREFIX)
