"""`layers: auto`: a short gradient probe on the first training batches picks each modality's layers.

It runs on the base model before wrapping (no adapters yet) and scores every candidate layer, i.e. the modules the
plan would adapt there, by how much the task needs it against how much the model's general behaviour rests on it:

- Importance of a module is the Fisher information of a scale `s` on each of its output channels, at `s = 1`:
  `(dL/ds_c)^2 = (sum_i W_ci dL/dW_ci)^2`, the gradient-times-weight (Taylor) term of the channel, squared. The
  scales are hook-local tensors multiplied onto the module output, so 4-bit weights need no weight gradient, and
  no `.grad` and no `requires_grad` of the model changes.
- Task importance: the loss on the batch's own labels (the answers to learn). General importance: the loss on the
  base model's own greedy predictions at the same positions, i.e. what the model already does. This stand-in needs
  no second data set, and the `keep:` rows cannot serve: they are built at train time with the host's template,
  after wrapping. Where the base already gives the task's answer the two agree; they differ where the task asks
  for a change.
- A layer's score is its share of the modality's task importance over its share of the general importance:
  above 1 the task leans on the layer more than the model's current behaviour does. `top_k` takes the best
  scores; `budget` takes the best scores whose adapters fit in the trainable-parameter budget.

Same seed and same batches, same layers and scores: the forwards run under a forked, seeded RNG (dropout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .arch import resolve_layout
from .config import MMTuningConfig, layer_span, load_config
from .errors import MMTuningError
from .targets import TargetPlan, plan_targets

AUTO_MODALITIES = ("vision", "language")
IGNORE_INDEX = -100
GENERAL = "the base model's own greedy answers on the task prompts"


@dataclass(frozen=True)
class LayerScore:
    layer: int
    task: float  # share of the modality's task importance
    general: float  # share of the modality's general importance
    score: float  # task / general
    params: int | None  # trainable parameters of the layer's planned adapters (None for lokr)
    chosen: bool


@dataclass
class ModalityProbe:
    limit: str  # "auto, top 4" / "auto, budget 2,000,000"
    layers: list[LayerScore]

    @property
    def chosen(self) -> list[int]:
        return sorted(s.layer for s in self.layers if s.chosen)


@dataclass
class ProbeReport:
    batches: int
    tokens: int  # answer tokens the scores rest on
    seed: int
    modalities: dict[str, ModalityProbe] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, list[int]]:
        return {m: p.chosen for m, p in self.modalities.items()}

    def summary(self) -> dict[str, Any]:
        """The `probe` object of the plan summary (inspect-targets --json, the run report)."""
        return {"batches": self.batches, "answer_tokens": self.tokens, "seed": self.seed, "general": GENERAL,
                "modalities": {m: {"limit": p.limit, "chosen": p.chosen,
                                   "layers": [dataclasses.asdict(s) for s in p.layers]}
                               for m, p in self.modalities.items()}}

    def describe(self) -> str:
        """One log line: the chosen layers per modality."""
        return "; ".join(f"{m} layers {layer_span(p.chosen)} ({p.limit})" for m, p in self.modalities.items())


def auto_modalities(config: MMTuningConfig) -> list[str]:
    return [m for m in AUTO_MODALITIES if config.spec(m).enabled and config.spec(m).layers.mode == "auto"]


def plan_with_probe(model: nn.Module, config: Any, batches: Iterable[dict[str, Any]] | None = None,
                    seed: int = 0, log: Any = None) -> TargetPlan:
    """The plan; under `layers: auto` the probe runs on `batches` first and its scores go into `plan.probe`.
    Without batches such a config is an error that says what data to give."""
    config = load_config(config)
    if not auto_modalities(config):
        return plan_targets(model, config)
    if batches is None:
        _limits(model, config)  # a limit no layer meets is the first thing to fix
        return plan_targets(model, config)  # names the data to give
    report = same_on_every_rank(probe_layers(model, config, batches, seed))
    if log is not None:
        log(f"mmtuning: layers chosen by the probe on {report.batches} batch(es): {report.describe()}")
    plan = plan_targets(model, config, probed=report.chosen)
    plan.probe = report
    return plan


def same_on_every_rank(report: ProbeReport) -> ProbeReport:
    """Rank 0's choice on every rank of a distributed run: each rank wraps the same modules even where floats
    differ across devices."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return report
    holder = [report]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def plan_unprobed(model: nn.Module, config: Any) -> TargetPlan:
    """A plan that takes every layer of the `auto` modalities: the early checks hosts run on a meta skeleton before
    any data exists (module names, ranks, quantization). The probe's plan replaces it before wrapping."""
    config = load_config(config)
    layout = resolve_layout(model)
    return plan_targets(model, config, probed={m: list(range(layout.usable_layers[m])) for m in auto_modalities(config)})


def probe_layers(model: nn.Module, config: Any, batches: Iterable[dict[str, Any]], seed: int = 0) -> ProbeReport:
    """Score every candidate layer of each `auto` modality on the first batches and choose within the limits."""
    config = load_config(config)
    modalities = auto_modalities(config)
    candidates, by_layer, costs = _limits(model, config)
    wanted = max(config.spec(m).layers.auto.batches for m in modalities)
    task, general, used, tokens = _importance(model, candidates, modalities, itertools.islice(iter(batches), wanted), seed)
    report = ProbeReport(used, tokens, seed)
    for modality in modalities:
        layers = sorted(by_layer[modality])
        names = {layer: [m.name for m in by_layer[modality][layer]] for layer in layers}
        task_share = _shares({layer: sum(task.get(n, 0.0) for n in names[layer]) for layer in layers})
        general_share = _shares({layer: sum(general.get(n, 0.0) for n in names[layer]) for layer in layers})
        scores = {layer: task_share[layer] / max(general_share[layer], 1e-12) for layer in layers}
        spec = config.spec(modality).layers.auto
        picked = _choose(scores, costs[modality], spec)
        report.modalities[modality] = ModalityProbe(spec.describe(), [
            LayerScore(layer, task_share[layer], general_share[layer], scores[layer], costs[modality][layer],
                       layer in picked)
            for layer in layers])
    return report


def _limits(model: nn.Module, config: MMTuningConfig):
    """The candidate plan, its modules per layer and their adapter sizes; a `top_k` or `budget` that no choice of
    layers can meet fails here, before any forward."""
    candidates = plan_unprobed(model, config)
    by_layer = {m: _modules_by_layer(candidates, m) for m in auto_modalities(config)}
    costs = {m: {layer: _adapter_params(candidates, planned) for layer, planned in layers.items()}
             for m, layers in by_layer.items()}
    for modality, sizes in costs.items():
        _check_limit(sizes, config.spec(modality).layers.auto, f"mmtuning.{modality}.layers.auto")
    return candidates, by_layer, costs


def _modules_by_layer(plan: TargetPlan, modality: str) -> dict[int, list]:
    layers: dict[int, list] = {}
    for planned in plan.modules_of(modality):
        if planned.leaf.layer is not None:
            layers.setdefault(planned.leaf.layer, []).append(planned)
    return layers


def _adapter_params(plan: TargetPlan, modules: list) -> int | None:
    """What the plan's adapters on these modules train (TargetPlan's own count, over these modules only)."""
    return dataclasses.replace(plan, modules=modules, parameters=[], modules_to_save=[], full_params=0).trainable_params()


def _shares(values: dict[int, float]) -> dict[int, float]:
    total = sum(values.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in values.items()}


def _check_limit(costs: dict[int, int | None], spec: Any, where: str) -> None:
    """`top_k` within the layer count; a `budget` that at least the smallest layer's adapters fit in."""
    count = len(costs)
    if spec.budget is None:
        if spec.top_k is not None and spec.top_k > count:
            raise MMTuningError(f"{where}.top_k: {spec.top_k} asks for more layers than this modality has ({count}, "
                                f"numbered 0-{count - 1}); write top_k: {count} or less, or `layers: all`.")
        return
    if any(cost is None for cost in costs.values()):
        raise MMTuningError(f"{where}.budget: the trainable parameters of method lokr depend on PEFT's factorisation, "
                            f"so a parameter budget cannot be checked; write {{auto: {{top_k: N}}}} or use method: lora.")
    smallest = min(costs, key=lambda layer: (costs[layer], layer))
    if spec.budget < costs[smallest]:
        raise MMTuningError(f"{where}.budget: {spec.budget:,} trainable parameters select no layer: the smallest "
                            f"layer's adapters (layer {smallest}) need {costs[smallest]:,}. Write budget: "
                            f"{costs[smallest]:,} or more, lower this modality's `r`, or use {{auto: {{top_k: N}}}}.")


def _choose(scores: dict[int, float], costs: dict[int, int | None], spec: Any) -> set[int]:
    """Best scores first (ties: the higher layer); `top_k` of them (the top half by default), or those whose
    adapters fit in `budget` (checked by `_check_limit`)."""
    order = sorted(scores, key=lambda layer: (-scores[layer], -layer))
    if spec.budget is None:
        return set(order[: spec.top_k if spec.top_k is not None else math.ceil(len(order) / 2)])
    left, picked = spec.budget, set()
    for layer in order:
        if costs[layer] <= left:
            picked.add(layer)
            left -= costs[layer]
    return picked


# --- the gradient pass -------------------------------------------------------------------------------------


def _importance(model: nn.Module, plan: TargetPlan, modalities: list[str], batches: Iterator[dict[str, Any]],
                seed: int) -> tuple[dict[str, float], dict[str, float], int, int]:
    """Per planned module of the `auto` modalities: summed squared channel-scale gradients of the task loss and
    of the general loss; plus the batches and answer tokens used."""
    from .base_view import cpu_4bit_repack_off
    from .keep import to_model

    modules = {m.name: model.get_submodule(m.name) for m in plan.modules if m.modality in modalities
               and m.leaf.layer is not None}
    scales: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    task = dict.fromkeys(modules, 0.0)
    general = dict.fromkeys(modules, 0.0)
    used = tokens = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_scaled_outputs(modules, scales))
        stack.enter_context(_checkpointing_off(model))
        stack.enter_context(cpu_4bit_repack_off(model))
        stack.enter_context(torch.enable_grad())
        for index, batch in enumerate(batches):
            batch = dict(batch)
            labels = batch.pop("labels", None)
            if labels is None:
                raise MMTuningError("layers: auto: the probe's batches carry no `labels`; the probe scores layers on "
                                    "the task's answers, so give it training batches as the trainer collates them.")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + index)
                logits = model(**to_model(batch, model)).logits
            if labels.shape != logits.shape[:2]:
                raise MMTuningError(f"layers: auto: a probe batch has labels of shape {tuple(labels.shape)} but the model "
                                    f"returned logits for {tuple(logits.shape[:2])} positions; give the batches as the "
                                    f"trainer collates them (labels aligned with input_ids).")
            targets = labels.to(logits.device)[:, 1:]
            mask = targets != IGNORE_INDEX
            used += 1
            if not mask.any():
                _clear(scales)
                continue
            tokens += int(mask.sum())
            shifted = logits[:, :-1][mask].float()
            losses = (nn.functional.cross_entropy(shifted, targets[mask]),
                      nn.functional.cross_entropy(shifted, shifted.detach().argmax(-1)))
            flat = [(name, s) for name, tensors in scales.items() for s in tensors]
            for loss, into, keep_graph in ((losses[0], task, True), (losses[1], general, False)):
                grads = torch.autograd.grad(loss, [s for _, s in flat], retain_graph=keep_graph, allow_unused=True)
                for (name, _), grad in zip(flat, grads):
                    if grad is not None:
                        into[name] += float(grad.double().pow(2).sum())
            _clear(scales)
    if used == 0:
        raise MMTuningError("layers: auto: the probe got no training batch; the training data is empty. Give it "
                            "training rows (the first batches are probed), or write the layers yourself (e.g. {top: 4}).")
    if tokens == 0:
        raise MMTuningError(f"layers: auto: the first {used} training batch(es) have no answer tokens (every label is "
                            f"{IGNORE_INDEX}), so no layer can be scored; check the data's answers, or write the layers "
                            f"yourself (e.g. {{top: 4}}).")
    return task, general, used, tokens


def _clear(scales: dict[str, list[torch.Tensor]]) -> None:
    for tensors in scales.values():
        tensors.clear()


@contextlib.contextmanager
def _scaled_outputs(modules: dict[str, nn.Module], scales: dict[str, list[torch.Tensor]]):
    """Multiply each module's output by a fresh ones-scale per output channel that requires grad; hooks removed
    afterwards."""

    def hook_for(name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return output
            scale = torch.ones(output.shape[-1], dtype=output.dtype, device=output.device, requires_grad=True)
            scales[name].append(scale)
            return output * scale
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _checkpointing_off(model: nn.Module):
    """Gradient checkpointing recomputes a layer's forward (the hooks would make new scales there): off for the
    probe, restored afterwards."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True
