"""Feature capture by forward hooks, during the host's own forward pass (no second full forward).

What can be captured, per modality (names from the model's `ModalityMap`):
- `projector`: inputs and output of the main projector module (the first projector prefix of the map);
- `language_input`: the embeddings the language model receives (image tokens already hold projected
  image features there), `language_output`: its last hidden state, `language_layer(i)`: layer i's output;
- `vision_layer(i)`: inputs and output of vision layer i.
Masks come from the batch: image tokens are `input_ids == image_token_id`; answer text is
`labels != -100` minus image tokens (the attention mask when there are no labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ModelLayout, unwrap
from ..errors import MMTuningError


@dataclass
class Record:
    """One call of a hooked module: what it got and what it returned."""

    args: tuple
    kwargs: dict
    output: Any


def first_tensor(value: Any) -> torch.Tensor:
    """The main tensor of a module output (a tensor, a tuple, or a ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    for attr in ("last_hidden_state", "pooler_output"):
        inner = getattr(value, attr, None)
        if isinstance(inner, torch.Tensor):
            return inner
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict):
        return next(v for v in value.values() if isinstance(v, torch.Tensor))
    raise MMTuningError(f"mmtuning losses: cannot find the hidden states in a module output of type {type(value).__name__}.")


class FeatureCapture:
    """Forward hooks on the modules the configured losses read, attached once and removed by `remove()`."""

    def __init__(self, model: nn.Module, layout: ModelLayout):
        self.model = unwrap(model)
        self.layout = layout
        self.records: dict[str, list[Record]] = {}
        self.paused = False  # set while a loss re-runs a module (frozen reference): those calls are not captured
        self._handles: list[Any] = []
        self._points: dict[str, tuple[nn.Module, str]] = {}
        self.trainable_points: set[str] = set()  # hooked modules holding trainable parameters
        # A new forward pass starts with empty records, so a forward outside compute_loss (eval, generate)
        # never accumulates tensors.
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self.records.clear()))

    # --- where ------------------------------------------------------------------------------------

    def _module(self, path: str, what: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise MMTuningError(f"mmtuning losses: {what} '{path}' is not in this model.") from None

    def projector(self) -> str:
        prefixes = self.layout.modality_map.projector
        if not prefixes:
            raise MMTuningError(f"mmtuning losses: the modality map of '{self.layout.model_type}' names no projector.")
        return self._hook("projector", self._module(prefixes[0], "projector"))

    def language_input(self) -> str:
        return self._hook("language_input", self._language_model())

    def language_output(self) -> str:
        return self._hook("language_output", self._language_model())

    def language_layer(self, index: int) -> str:
        return self._hook(f"language_layer.{self.layer_index('language', index)}", self._layer("language", index))

    def vision_layer(self, index: int) -> str:
        return self._hook(f"vision_layer.{self.layer_index('vision', index)}", self._layer("vision", index))

    def layer_index(self, modality: str, index: int) -> int:
        """`index` as a non-negative layer number (-1 is the last layer whose output the model uses, as in
        target selection: LLaVA's last vision layer feeds nothing)."""
        count = self.layout.usable_layers.get(modality, 0)
        if not -count <= index < count:
            raise MMTuningError(f"mmtuning.losses: {modality} layer {index} does not exist; this model has {count} "
                                f"{modality} layers, numbered 0-{count - 1} (or -1 for the last).")
        return index % count

    def layer_module(self, modality: str, index: int) -> nn.Module:
        return self._layer(modality, index)

    def _language_model(self) -> nn.Module:
        return self._module(self.layout.modality_map.language[0], "language model")

    def _layer(self, modality: str, index: int) -> nn.Module:
        index = self.layer_index(modality, index)
        for stack in self.layout.modality_map.layer_stacks(modality):
            layers = self.model.get_submodule(stack)
            if index < len(layers):
                return layers[index]
            index -= len(layers)
        raise AssertionError("layer counts and stacks disagree")

    def _hook(self, key: str, module: nn.Module) -> str:
        if key in self._points:
            return key
        self._points[key] = (module, key)
        if any(p.requires_grad for p in module.parameters()):
            self.trainable_points.add(key)
        if key == "language_input":
            hook = module.register_forward_pre_hook(self._store_input(key), with_kwargs=True)
        else:
            hook = module.register_forward_hook(self._store(key), with_kwargs=True)
        self._handles.append(hook)
        return key

    def _store(self, key: str):
        def hook(module, args, kwargs, output):
            if not self.paused:
                self.records.setdefault(key, []).append(Record(args, kwargs, output))
        return hook

    def _store_input(self, key: str):
        def hook(module, args, kwargs):
            if not self.paused:
                embeds = kwargs.get("inputs_embeds")
                if embeds is None and args:
                    embeds = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
                self.records.setdefault(key, []).append(Record(args, kwargs, embeds))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._points.clear()
        self.records.clear()


@dataclass
class StepFeatures:
    """What one loss computation sees: captured records plus the batch's masks."""

    records: dict[str, list[Record]]
    inputs: dict[str, Any]
    image_token_id: int | None
    capture: FeatureCapture
    cache: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> list[Record]:
        found = self.records.get(key)
        if not found:
            raise MMTuningError(
                f"mmtuning losses: no '{key}' features were captured in this forward pass. The loss must be computed "
                f"right after the model's forward on the same batch (MMTuning.extra_losses(model, inputs, outputs))."
            )
        return found

    def output(self, key: str) -> torch.Tensor:
        tensor = first_tensor(self.get(key)[-1].output)
        if key in self.capture.trainable_points:
            require_graph(tensor, key)
        return tensor

    def image_mask(self) -> torch.Tensor:
        if "image_mask" not in self.cache:
            ids = self.inputs.get("input_ids")
            if ids is None or self.image_token_id is None:
                raise MMTuningError("mmtuning losses: image-token losses need `input_ids` in the batch and an image "
                                    "token id in the model config (image_token_id / image_token_index).")
            self.cache["image_mask"] = ids == self.image_token_id
        return self.cache["image_mask"]

    def text_mask(self) -> torch.Tensor:
        """Answer/caption tokens: labelled positions that are not image tokens; all attended text without labels."""
        if "text_mask" not in self.cache:
            image = self.image_mask()
            attended = self.inputs.get("attention_mask")
            attended = torch.ones_like(image) if attended is None else attended.bool()
            text = attended & ~image
            labels = self.inputs.get("labels")
            if labels is not None and labels.shape == image.shape:
                answer = text & (labels != -100)
                has_answer = answer.any(dim=1, keepdim=True)
                text = torch.where(has_answer, answer, text)
            self.cache["text_mask"] = text
        return self.cache["text_mask"]


def require_graph(tensor: torch.Tensor, key: str) -> None:
    """A trainable module's output without autograd history under grad mode means it ran under no_grad (a
    module checkpointed whole with reentrant checkpointing): the loss would silently train nothing through it.
    transformers 5 checkpoints layers' `forward` only, so its own checkpointing never triggers this."""
    if torch.is_grad_enabled() and not tensor.requires_grad:
        raise MMTuningError(
            f"mmtuning losses: the captured '{key}' features carry no gradient. This happens with reentrant "
            f"gradient checkpointing; set gradient_checkpointing_kwargs: {{use_reentrant: false}} (the transformers "
            f"default), or drop the loss that reads '{key}'."
        )


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `states` (B, S, D) over positions where `mask` (B, S) is true, in float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (states.to(torch.float32) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)
