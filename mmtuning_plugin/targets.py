"""Target resolution: an `MMTuningConfig` plus a model become an exact `TargetPlan`.

The plan lists full module names (never suffixes or regexes, so transformers renames cannot make it
match the wrong thing), per-module rank/alpha, bare parameters for `target_parameters`, and modules to
train whole. `peft_config(plan)` turns it into a PEFT config that wraps exactly those modules, and
`verify_wrapped` checks, after wrapping, that PEFT did exactly that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .arch import MODALITIES, Leaf, ModalityMap, ModelLayout, resolve_layout, unwrap
from .config import KINDS, MMTuningConfig, load_config
from .errors import MMTuningError, PlanMismatchError
from .methods import method_of
from .methods.inits import apply_inits, check_init_data
from .names import module_of
from .selective.plan import SelectedModule, plan_selective
from .selective.runtime import selective_problems, settle_selected

DEFAULT_DROPOUT = 0.05

@dataclass(frozen=True)
class PlannedModule:
    leaf: Leaf
    r: int
    alpha: float

    @property
    def name(self) -> str:
        return self.leaf.name

    @property
    def modality(self) -> str:
        return self.leaf.modality


@dataclass(frozen=True)
class PlannedParameter:
    """A bare weight (no nn.Linear around it) adapted through PEFT `target_parameters`."""

    name: str
    modality: str
    shape: tuple[int, ...]
    r: int
    alpha: float


@dataclass
class TargetPlan:
    model_type: str
    config: MMTuningConfig
    modules: list[PlannedModule]
    parameters: list[PlannedParameter]
    modules_to_save: list[str]
    layers: dict[str, list[int]]
    layout: ModelLayout
    full_params: int = 0  # parameters trained whole through modules_to_save
    selected: list[SelectedModule] = field(default_factory=list)  # selective tuning (also in modules_to_save)
    probe: Any = None  # the `layers: auto` probe's scores (probe.ProbeReport), when it chose layers
    absent: tuple[str, ...] = ()  # modalities this model does not have (BLIP and Pix2Struct: no projector)

    @property
    def dropout(self) -> float:
        if self.config.dropout is not None:
            return self.config.dropout
        return 0.0 if self.parameters else DEFAULT_DROPOUT

    @property
    def target_modules(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def peft_target_modules(self) -> list[str] | str | None:
        """`target_modules` for PEFT: PEFT's dummy marker when only modules_to_save train (selective tuning,
        `projector: {full: true}`), since PEFT refuses a config that targets nothing."""
        if self.modules_to_save and not self.modules and not self.parameters:
            from peft.utils.constants import DUMMY_TARGET_MODULES

            return DUMMY_TARGET_MODULES
        return self.target_modules or None

    @property
    def target_parameters(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def default_modality(self) -> str:
        """Whose r/alpha are the adapter's top-level ones: the language model's, when it is adapted."""
        planned = {item.modality for item in [*self.modules, *self.parameters]}
        return next((m for m in ("language", "projector", "vision") if m in planned), "language")

    @property
    def r(self) -> int:
        """The adapter config's top-level r: a rank some module really uses (the language default)."""
        return self.config.rank(self.default_modality)

    @property
    def alpha(self) -> float:
        return self.config.scale_alpha(self.default_modality)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """Exact-name patterns (regex-escaped: PEFT matches keys as regexes) where r differs from the default."""
        return {key: item.r for key, item in self._pattern_items() if item.r != self.r}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return {key: item.alpha for key, item in self._pattern_items() if item.alpha != self.alpha}

    def _pattern_items(self):
        """Exact full names, regex-escaped (PEFT matches pattern keys as `(.*\\.)?(key)$`)."""
        for item in [*self.modules, *self.parameters]:
            yield re.escape(item.name), item

    def modules_of(self, modality: str) -> list[PlannedModule]:
        return [m for m in self.modules if m.modality == modality]

    def parameters_of(self, modality: str) -> list[PlannedParameter]:
        return [p for p in self.parameters if p.modality == modality]

    def modality_of(self, name: str) -> str | None:
        """Modality of a planned module or parameter name (for optimizer groups, reports)."""
        for item in [*self.modules, *self.parameters, *self.selected]:
            if item.name == name:
                return item.modality
        return None

    def selected_of(self, modality: str) -> list[SelectedModule]:
        return [s for s in self.selected if s.modality == modality]

    def frozen_in_copy(self, parameter_name: str) -> bool:
        """A tensor of a selected module's trainable copy that its method does not train (`bias`: the weight)."""
        if ".modules_to_save." not in parameter_name:
            return False
        owner = module_of(parameter_name)
        local = parameter_name.rsplit(".", 1)[-1]
        return any(s.name == owner and local not in s.trained for s in self.selected)

    def trainable_params(self, modality: str | None = None) -> int | None:
        """Adapter parameters PEFT will create (None where the method cannot say before wrapping: lokr)."""
        method = method_of(self.config)
        counts = [method.trainable(m.leaf, m.r, self.config) for m in self.modules if modality in (None, m.modality)]
        if None in counts:
            return None
        total = sum(counts) + sum(p.r * (p.shape[0] + p.shape[1]) for p in self.parameters if modality in (None, p.modality))
        if modality in (None, "projector"):
            total += self.full_params
        return total + sum(s.trained_params for s in self.selected if modality in (None, s.modality))

    def summary(self) -> dict[str, Any]:
        """The `plan` object of `inspect-targets --json`."""
        return {
            "target_modules": self.target_modules,
            "target_parameters": self.target_parameters,
            "modules_to_save": self.modules_to_save,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "layers": self.layers,
            "method": self.config.method,
            "method_options": method_of(self.config).describe(self.config.method_options),
            "r": self.r,
            "alpha": self.alpha,
            "trainable_params": self.trainable_params(),
            "selective": {s.modality: s.method for s in self.selected},
            **({"probe": self.probe.summary()} if self.probe is not None else {}),
        }


# --- planning -------------------------------------------------------------------------------------


def plan_targets(model: nn.Module, config: Any = None, modality_map: ModalityMap | None = None,
                 probed: dict[str, list[int]] | None = None) -> TargetPlan:
    """Resolve `config` (a MMTuningConfig or its dict) against `model` into an exact plan. `probed`: the layers of
    `layers: auto` modalities, picked by the probe (probe.py); without it such a modality is an error."""
    config = load_config(config)
    layout = resolve_layout(model, modality_map)
    modules: list[PlannedModule] = []
    parameters: list[PlannedParameter] = []
    modules_to_save: list[str] = []
    selected: list[SelectedModule] = []
    layers: dict[str, list[int]] = {}
    base = unwrap(model)
    absent = absent_modalities(layout)
    for modality in MODALITIES:
        spec = config.spec(modality)
        if not spec.enabled:
            continue
        where = f"mmtuning.{modality}"
        if modality in absent:
            _refuse_if_asked(config, modality, layout, where)
            continue
        r, alpha = config.rank(modality), config.scale_alpha(modality)
        if modality == "projector":
            chosen, params, whole = _plan_projector(base, layout, config, where)
            parameters += [PlannedParameter(n, modality, s, r, alpha) for n, s in params]
            modules_to_save += whole
            if layout.layer_counts.get("projector"):  # the Q-Former's selected layers, for reports and schedules
                layers[modality] = sorted({leaf.layer for leaf in chosen if leaf.layer is not None})
        else:
            layers[modality] = sorted(probed[modality]) if probed and modality in probed else \
                spec.layers.resolve(layout.usable_layers[modality], f"{where}.layers", total=layout.layer_counts[modality])
            in_layers = [leaf for leaf in layout.leaves_of(modality) if leaf.layer in layers[modality]]
            chosen = _select(in_layers, spec, where, layout) + _extras(layout, modality, spec, where)
        if spec.selective is not None:  # the modality's own weights train instead of adapters
            selected += plan_selective(base, layout, config, modality, chosen, layers.get(modality), where)
            continue
        modules += [PlannedModule(leaf, r, alpha) for leaf in method_of(config).place(chosen)]
    _check_method_support(modules, parameters, config)
    full = sum(p.numel() for name in modules_to_save for p in base.get_submodule(name).parameters())
    plan = TargetPlan(layout.model_type, config, modules, parameters, modules_to_save + [s.name for s in selected],
                      layers, layout, full, selected, absent=absent)
    if not plan.modules and not plan.parameters and not plan.modules_to_save:
        raise MMTuningError("The mmtuning settings select no module at all; enable a modality with modules in it.")
    return plan


def absent_modalities(layout: ModelLayout) -> tuple[str, ...]:
    """Modalities the model has no part for: BLIP, Pix2Struct and encoder-decoder stacks feed the vision tower's
    output to the language model directly, without a projector."""
    return tuple(m for m in MODALITIES if not getattr(layout.modality_map, m)
                 and not (m == "projector" and layout.modality_map.projector_parameters))


def _refuse_if_asked(config: MMTuningConfig, modality: str, layout: ModelLayout, where: str) -> None:
    """The defaults skip an absent modality (reported as absent); a block that asks for it is refused."""
    if modality in config.model_fields_set:
        raise MMTuningError(
            f"{where}: '{layout.model_type}' has no {modality} (its modules: "
            f"{', '.join(m for m in MODALITIES if m not in absent_modalities(layout))}), so these settings would "
            f"adapt nothing; remove `{modality}:` from the block, or write `{modality}: false`.")


def _plan_projector(model, layout: ModelLayout, config: MMTuningConfig, where: str):
    spec = config.projector
    leaves = layout.leaves_of("projector")
    if layout.layer_counts.get("projector"):  # a bridge with its own layers (Q-Former): `layers` selects among them
        chosen_layers = spec.layers.resolve(layout.usable_layers["projector"], f"{where}.layers",
                                            total=layout.layer_counts["projector"])
        leaves = [leaf for leaf in leaves if leaf.layer is None or leaf.layer in chosen_layers]
    elif spec.layers.mode != "all":
        raise MMTuningError(f"{where}.layers: the projector has no numbered layers; remove `layers` from it.")
    bare = [(n, tuple(model.get_parameter(n).shape)) for n in layout.modality_map.projector_parameters]
    if spec.full:
        return [], [], list(layout.modality_map.projector)
    if spec.selective is not None:  # its own Linear modules and norms (selective/plan.py); no bare adapter
        if bare and spec.selective.method in ("full", "spider"):
            raise MMTuningError(
                f"{where}.selective: {spec.selective.method} trains Linear modules and norms, but the projector of "
                f"'{layout.model_type}' is the bare weight {bare[0][0]}, which it would leave out; write "
                f"`projector: {{full: true}}` to train it whole, or `selective: layernorm` for its norm.")
        return (_select(leaves, spec, where, layout) if leaves else []), [], []
    if not leaves and not bare:
        raise MMTuningError(
            f"{where}: the projector of '{layout.model_type}' ({', '.join(layout.modality_map.projector)}) has no "
            f"Linear module or known bare weight to adapt; write `projector: {{full: true}}` to train it whole, "
            f"or `projector: false`."
        )
    chosen = _select(leaves, spec, where, layout) if leaves else []
    if not leaves and spec.modules != "all-linear":
        raise MMTuningError(f"{where}.modules: this projector has no Linear modules, only the bare weight(s) "
                            f"{[n for n, _ in bare]}; remove `modules` to adapt those.")
    return chosen, bare, []


def _select(candidates: list[Leaf], spec, where: str, layout: ModelLayout) -> list[Leaf]:
    """Leaves matching the spec's kinds (`attention`, `mlp`, `all-linear`) or explicit local names."""
    kinds, names = spec.kinds_and_names()
    layer_kinds = {"attention", "mlp", "other", "projector"}
    wanted = layer_kinds if "all-linear" in kinds else kinds
    chosen = [leaf for leaf in candidates if leaf.kind in wanted]
    for name in names:
        hits = [leaf for leaf in candidates if leaf.local == name or leaf.local.endswith("." + name)]
        if not hits:
            raise MMTuningError(
                f"{where}.modules: '{name}' matches no module in the selected layers. Available here: "
                f"{', '.join(sorted({leaf.local for leaf in candidates if leaf.kind in layer_kinds}))}; "
                f"or a kind: {', '.join(KINDS)}."
            )
        chosen += hits
    if not chosen:
        present = sorted({leaf.kind for leaf in candidates if leaf.kind in layer_kinds})
        raise MMTuningError(
            f"{where}.modules: {spec.modules!r} selects no module of '{layout.model_type}' in the chosen layers. "
            f"What exists there: kinds {present or 'none'}, names "
            f"{', '.join(sorted({leaf.local for leaf in candidates})) or 'none'}."
        )
    unique = {leaf.name: leaf for leaf in chosen}
    return [leaf for leaf in candidates if leaf.name in unique]


def _extras(layout: ModelLayout, modality: str, spec, where: str) -> list[Leaf]:
    chosen = []
    for kind in spec.include:
        hits = [leaf for leaf in layout.leaves_of(modality) if leaf.kind == kind]
        if not hits:
            raise MMTuningError(f"{where}.include: '{kind}' does not exist in '{layout.model_type}'; remove it.")
        chosen += hits
    return chosen


def _check_method_support(modules: list[PlannedModule], parameters: list[PlannedParameter], config) -> None:
    method = method_of(config)
    bad = [m for m in modules if m.leaf.module_type not in method.leaf_types and not _is_linear_subclass(m.leaf)]
    if bad:
        raise MMTuningError(
            f"method: {config.method} cannot adapt {bad[0].leaf.module_type} modules such as {bad[0].name}; "
            f"use method: lora or drop `{bad[0].leaf.kind}` from include."
        )
    if parameters and config.dropout:
        raise MMTuningError(
            f"dropout: {config.dropout} cannot apply to the bare projector weight {parameters[0].name} (PEFT's "
            f"target_parameters wrapper has no dropout); remove `dropout` (it then defaults to 0 for this model), "
            f"or write `projector: {{full: true}}` / `projector: false`."
        )
    calibrated = [m for m in modules if config.init_of(m.modality) != "lora"]
    odd = [m for m in calibrated if not _is_linear_subclass(m.leaf) and m.leaf.module_type != "Linear"]
    bare = [p for p in parameters if config.init_of(p.modality) != "lora"]
    if odd or bare:
        name, modality = (odd[0].name, odd[0].modality) if odd else (bare[0].name, bare[0].modality)
        raise MMTuningError(
            f"{modality}.init: {config.init_of(modality)} starts LoRA on Linear weights, but {name} is not one "
            f"(a conv, an embedding or a bare weight); leave it out (`include`), or write `{modality}: {{init: lora}}`.")
    if parameters and not method.bare_parameters:
        raise MMTuningError(
            f"method: {config.method} cannot adapt bare parameters ({parameters[0].name}, the projector of this "
            f"model); use method: lora, `projector: {{full: true}}`, or `projector: false`."
        )


def _is_linear_subclass(leaf: Leaf) -> bool:
    return leaf.kind not in ("patch_embed", "embed_tokens") and leaf.module_type not in ("Conv2d", "Conv3d", "Embedding")


# --- PEFT ------------------------------------------------------------------------------------------


def peft_config(plan: TargetPlan, **overrides: Any):
    """A PEFT config that wraps exactly `plan.target_modules` (full names, so no suffix surprises)."""
    common: dict[str, Any] = {
        "target_modules": plan.peft_target_modules,
        "modules_to_save": plan.modules_to_save or None,
    }
    return method_of(plan.config).peft_config(plan, common, overrides)


def apply_plan(model: nn.Module, plan: TargetPlan, adapter_name: str = "default", calibration: Any = None,
               **overrides: Any):
    """Wrap `model` with PEFT per `plan` and check the result (raises PlanMismatchError). `calibration`: the
    training batches a data-reading init (`init: corda`) needs."""
    import warnings

    from peft import get_peft_model

    check_init_data(plan, calibration)
    with warnings.catch_warnings():
        # PEFT's check of rank/alpha patterns looks only at module names and so warns about the patterns of
        # bare parameters, which it does apply; verify_wrapped below checks every rank itself.
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        peft_model = get_peft_model(model, peft_config(plan, **overrides), adapter_name=adapter_name)
    apply_inits(peft_model, plan, adapter_name, calibration)
    settle_selected(peft_model, plan)
    verify_wrapped(peft_model, plan, adapter_name)
    return peft_model


@dataclass
class WrappedSet:
    modules: dict[str, int | None] = field(default_factory=dict)  # name -> rank (None where rankless)
    parameters: dict[str, int | None] = field(default_factory=dict)
    modules_to_save: set[str] = field(default_factory=set)


def wrapped_set(model: nn.Module, adapter_name: str = "default") -> WrappedSet:
    """What PEFT actually wrapped, with names relative to the transformers model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    found = WrappedSet()
    for name, module in model.named_modules():
        relative = module_of(name)
        if isinstance(module, ModulesToSaveWrapper):
            found.modules_to_save.add(relative)
        if not isinstance(module, BaseTunerLayer):
            continue
        rank = _rank_of(module, adapter_name)
        parameter = getattr(module, "parameter_name", None)
        if parameter:
            found.parameters[f"{relative}.{parameter}"] = rank
        else:
            found.modules[relative] = rank
    return found


def _rank_of(module: nn.Module, adapter_name: str) -> int | None:
    ranks = getattr(module, "r", None)
    return ranks.get(adapter_name) if isinstance(ranks, dict) else None


def verify_wrapped(model: nn.Module, plan: TargetPlan, adapter_name: str = "default") -> WrappedSet:
    """Raise PlanMismatchError unless the wrapped modules, parameters and ranks equal the plan."""
    found = wrapped_set(model, adapter_name)
    problems = []
    method = method_of(plan.config)
    planned_modules = {m.name: method.size(m.leaf, m.r, plan.config) for m in plan.modules}
    planned_params = {p.name: p.r for p in plan.parameters}
    for label, planned, actual in (("modules", planned_modules, found.modules),
                                   ("parameters", planned_params, found.parameters)):
        missing = sorted(set(planned) - set(actual))
        extra = sorted(set(actual) - set(planned))
        if missing:
            problems.append(f"planned {label} without an adapter: {_few(missing)}")
        if extra:
            problems.append(f"{label} with an adapter that the plan did not ask for: {_few(extra)}")
        if method.ranked:
            wrong = [f"{n} (r={actual[n]}, planned {r})" for n, r in planned.items()
                     if n in actual and actual[n] is not None and actual[n] != r]
            if wrong:
                problems.append(f"{label} with the wrong rank: {_few(wrong)}")
    missing_whole = sorted(set(plan.modules_to_save) - found.modules_to_save)
    if missing_whole:
        problems.append(f"modules planned to train whole but not wrapped: {_few(missing_whole)}")
    else:
        problems += selective_problems(model, plan, adapter_name)
    if problems:
        raise PlanMismatchError(
            "PEFT did not wrap what mmtuning planned for "
            f"'{plan.model_type}': " + "; ".join(problems) + ". Something else changed the targets (a host "
            "setting such as lora_target_modules, or another adapter); remove it and let mmtuning set the targets."
        )
    return found


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
