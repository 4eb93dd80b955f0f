"""The PEFT plumbing mmtuning's own methods share: a config that targets exact module names, a layer around one
Linear (16-bit, 4-bit or 8-bit) that cannot merge, and a tuner that wraps each target in its method's layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import MMTuningError
from .peft_types import extend_peft_type


@dataclass
class ExactTargetsConfig(PeftConfig):
    """Targets are exact module names (mmtuning's plan), with modules trained whole beside them."""

    peft_name: ClassVar[str] = ""

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Exact module names."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(self.peft_name)


class LinearAdapterLayer(BaseTunerLayer):
    """A method's layer around one Linear; `not_mergeable` says why it has no weight delta to merge."""

    not_mergeable: ClassVar[str] = ""

    def _wrap(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise MMTuningError(self.not_mergeable)

    def unmerge(self) -> None:
        raise MMTuningError(self.not_mergeable)


class LinearTuner(BaseTuner):
    """Wraps each targeted Linear in `linear_class(target, adapter_name, **settings)`; a second adapter on an already
    wrapped module goes through its `update_layer(adapter_name, **settings)`."""

    target_module_mapping: dict = {}
    linear_class: ClassVar[type]

    def layer_settings(self, peft_config: Any, current_key: str) -> dict[str, Any]:
        raise NotImplementedError

    def extra_layer_arguments(self, peft_config: Any, current_key: str) -> dict[str, Any]:
        """Arguments the layer takes once, when it is created (not per adapter)."""
        return {}

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs) -> None:
        settings = self.layer_settings(peft_config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, **settings)
            return
        if not isinstance(target, nn.Linear):
            raise MMTuningError(f"{current_key}: {peft_config.peft_type} adapts Linear modules, not a "
                                f"{type(target).__name__}; leave it out of the targets")
        new_module = self.linear_class(target, adapter_name, **self.extra_layer_arguments(peft_config, current_key),
                                       **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
