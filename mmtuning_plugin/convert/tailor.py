"""tailor: keep the salient share of a LoRA adapter's delta per modality and write it as a sparse adapter.

Posterior selective tuning on one adapter (Model Tailor, ICML'24, keeps a small salient share of the fine-tuned
change, compensates for the rest, and leaves every other base weight as it was). Each module keeps its modality's
share of the entries of its delta `scaling * B @ A`, so no module is emptied. Salience:
- `magnitude`: |delta_ij|; needs no data.
- `activation`: delta_ij^2 * E[x_j^2], the loss increase Optimal Brain Damage estimates for dropping the entry, with
  x the module's input over the calibration items (`--calib`, an eval JSONL of the new task).
- `fisher`: delta_ij^2 * F_ij, with F the empirical Fisher of the merged weight on the calibration items' answer
  loss (Model Tailor's salience: the second-order loss increase when the entry's change is dropped).
`--compensate` then refits the kept entries of each output row by least squares so that, on the calibration
inputs, the row's output stays as close as it can to the full delta's (Model Tailor's compensation, OBS-style).
The kept entries are written as mmtuning's sparse PEFT method (methods/sparse.py): the result loads with
`PeftModel.from_pretrained` and scores with `mmtune eval`, so E/F before and after tailoring sit side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..arch import MODALITIES
from ..errors import MMTuningError
from .adapter import PREFIX, WEIGHTS_FILE, read_adapter
from .layouts import CURRENT
from .modality import Located
from .placement import safe_output


def parse_shares(text: Optional[str]) -> dict[str, float]:
    """`vision=0.05,language=0.1` -> {"vision": 0.05, "language": 0.1}."""
    shares: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        try:
            share = float(value) if sep else -1.0
        except ValueError:
            share = -1.0
        if key.strip() not in MODALITIES or not 0 < share <= 1:
            raise MMTuningError(f"--per-modality {item!r}: write MODALITY=SHARE with a modality of {', '.join(MODALITIES)} "
                                f"and a share in (0, 1], e.g. --per-modality vision=0.05,language=0.1.")
        shares[key.strip()] = share
    return shares


SALIENCE = ("magnitude", "activation", "fisher")
DAMPING = 0.01  # of the mean input second moment, added to the diagonal before solving (as SparseGPT does)


def salient(delta: torch.Tensor, share: float, curvature: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, k) indices and values of the `share` most salient entries of `delta` (k >= 1), in index order. Salience:
    |delta|, or delta^2 times a diagonal curvature estimate when `curvature` is given (the input second moment
    per column for `activation`, broadcast over rows; the Fisher per entry for `fisher`)."""
    count = max(1, math.ceil(share * delta.numel()))
    score = delta.abs() if curvature is None else delta.pow(2) * curvature.expand_as(delta)
    chosen = torch.topk(score.flatten(), count, sorted=False).indices.sort().values
    columns = delta.shape[1]
    return torch.stack([chosen // columns, chosen % columns]), delta.flatten()[chosen]


def compensated(delta: torch.Tensor, indices: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """The kept entries refit per output row: argmin_w E[(w . x_K - delta_i . x)^2] = (C_KK + damping)^-1 (C delta_i)_K,
    with C the inputs' second-moment matrix."""
    values = torch.empty(indices.shape[1], dtype=delta.dtype)
    target = delta @ moment  # row i: (C delta_i)
    damping = DAMPING * float(moment.diagonal().mean()) + 1e-12
    rows, columns = indices
    starts = torch.searchsorted(rows, torch.arange(delta.shape[0] + 1))
    for row in range(delta.shape[0]):
        begin, end = int(starts[row]), int(starts[row + 1])
        if begin == end:
            continue
        kept = columns[begin:end]
        system = moment[kept][:, kept] + damping * torch.eye(end - begin)
        values[begin:end] = torch.linalg.solve(system, target[row, kept])
    return values


def input_moments(adapter_dir: Path, base: Optional[str], calib: Path,
                  fisher: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per adapted module (current name): the in x in second-moment matrix of its inputs over every token of the
    calibration items (in^2 floats per module: 64 MiB for a 4096-wide layer); with `fisher`, also the empirical
    Fisher of its merged weight, the mean over items of (dL/dW)^2 with L the item's answer loss (one backward per
    item, at the adapted weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..base_view import cpu_4bit_repack_off
    from ..evaluate import item_batches, load_adapter_model, read_items
    from ..names import module_of

    items = read_items(calib, "calib")
    model, processor, _ = load_adapter_model(adapter_dir, base, four_bit=False)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    squares: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def collect(name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
            inputs[name] = x
        return hook

    def gradient_of(name: str):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: add_square(name, grad))
        return hook

    def add_square(name: str, grad: torch.Tensor) -> None:
        weight_grad = grad.detach().float().reshape(-1, grad.shape[-1]).T @ inputs[name]  # dL/dW of this item
        squares[name] = squares.get(name, 0) + weight_grad.pow(2)

    layers = {module_of(name): module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    hooks = [module.register_forward_pre_hook(collect(name)) for name, module in layers.items()]
    if fisher:
        hooks += [module.register_forward_hook(gradient_of(name)) for name, module in layers.items()]
        for name, parameter in model.named_parameters():  # a graph through every adapted layer; never stepped
            parameter.requires_grad_(any(marker in name for marker in ("lora_A", "lora_B")))
    try:
        model.eval()
        with torch.set_grad_enabled(fisher), cpu_4bit_repack_off(model):
            for batch in item_batches(items, processor, batch_size=1 if fisher else 4):
                output = model(**batch)
                if fisher:
                    output.loss.backward()
                    model.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.remove()
    moments = {name: total / counts[name] for name, total in sums.items()}
    return moments, {name: total / len(items) for name, total in squares.items()}


def tailor(adapter_dir: Path, out: Path, keep: Optional[float] = None, per_modality: Optional[str] = None,
           by: Optional[str] = None, calib: Optional[Path] = None, compensate: bool = False, base: Optional[str] = None,
           source: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    by = by or ("activation" if calib else "magnitude")
    if by not in SALIENCE:
        raise MMTuningError(f"--by {by}: write one of {', '.join(SALIENCE)}.")
    if (by != "magnitude" or compensate) and calib is None:
        what = "--compensate" if compensate else f"--by {by}"
        raise MMTuningError(f"{what} reads the modules' inputs on data of the new task: add --calib DATA.jsonl (an "
                            f"eval set: image, question, answer per line), or use --by magnitude without it.")
    shares = parse_shares(per_modality)
    if keep is None and not shares:
        raise MMTuningError("tailor needs --keep SHARE (e.g. 0.1: a tenth of each module's delta) and/or "
                            "--per-modality vision=0.05,language=0.1.")
    if keep is not None and not 0 < keep <= 1:
        raise MMTuningError(f"--keep {keep}: write the share of each module's delta entries to keep, in (0, 1] "
                            f"(e.g. --keep 0.1).")
    located = Located(read_adapter(Path(adapter_dir)), base, source)
    adapter = located.current
    _refuse_what_a_sparse_delta_cannot_hold(adapter, Path(adapter_dir))
    if calib is not None and located.layout != CURRENT:
        raise MMTuningError(f"--calib runs the adapter on this transformers ({CURRENT} layout), but {adapter_dir} is in "
                            f"the {located.layout} layout; remap it first (mmtune convert remap {adapter_dir} --out ...).")
    moments, fishers = input_moments(Path(adapter_dir), base, Path(calib), fisher=by == "fisher") \
        if calib is not None else ({}, {})
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    rows, dropped_all, total_all, lost_all, whole_all = [], 0.0, 0.0, 0.0, 0.0
    for module, factors in adapter.modules.items():
        modality = located.base.modality(module)
        share = shares.get(modality, keep if keep is not None else 1.0)
        delta = factors.delta()
        moment = moments.get(module)
        curvature = {"activation": lambda: moment.diagonal()[None, :], "fisher": lambda: fishers.get(module),
                     "magnitude": lambda: None}[by]()
        if by == "fisher" and curvature is None:
            raise MMTuningError(f"--by fisher: {module} got no gradient from the --calib items (does the answer loss "
                                f"reach it?); use --by activation, or calibration items that pass through it.")
        indices, values = salient(delta, share, curvature)
        if compensate:
            values = compensated(delta, indices, moment)
        kept = torch.zeros_like(delta).index_put((indices[0], indices[1]), values)
        total = float(delta.pow(2).sum())
        dropped = float((delta - kept).pow(2).sum())
        dropped_all, total_all = dropped_all + dropped, total_all + total
        if moment is not None:
            lost, whole = output_energy(delta - kept, moment), output_energy(delta, moment)
            lost_all, whole_all = lost_all + lost, whole_all + whole
        tensors[f"{PREFIX}{module}.sparse_values"] = values.contiguous()
        tensors[f"{PREFIX}{module}.sparse_indices"] = indices.contiguous()
        counts[module] = values.numel()
        rows.append({"module": module, "modality": modality, "share": share, "kept": values.numel(),
                     "entries": delta.numel(), "relative_error": _ratio(dropped, total),
                     **({"output_relative_error": _ratio(lost, whole)} if moment is not None else {})})
    unused = sorted(set(shares) - {row["modality"] for row in rows})
    if unused:
        raise MMTuningError(f"--per-modality names {', '.join(unused)} but the adapter has no module of that modality.")
    with safe_output(Path(out), force, (Path(adapter_dir),)) as temp:
        _write(temp, adapter.config, counts, tensors)
    by_modality: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_modality.setdefault(row["modality"], {"share": row["share"], "kept": 0, "entries": 0})
        entry["kept"] += row["kept"]
        entry["entries"] += row["entries"]
    return {"command": "tailor", "adapter": str(adapter_dir), "out": str(out), "layout": located.layout,
            "by": by, "compensated": compensate, "calib": str(calib) if calib else None, "modalities": by_modality, "modules": rows,
            "total_relative_error": _ratio(dropped_all, total_all),
            **({"total_output_relative_error": _ratio(lost_all, whole_all)} if moments else {})}


def output_energy(delta: torch.Tensor, moment: torch.Tensor) -> float:
    """E[|delta x|^2] over the calibration inputs, from their second-moment matrix."""
    return float(((delta @ moment) * delta).sum())


def _ratio(part: float, whole: float) -> float:
    return math.sqrt(part / whole) if whole > 0 else 0.0


def _refuse_what_a_sparse_delta_cannot_hold(adapter, path: Path) -> None:
    embedding = [m for m, f in adapter.modules.items() if f.embedding]
    if embedding:
        raise MMTuningError(f"{path}: {embedding[0]} is an embedding; tailor writes sparse deltas of Linear weights. "
                            f"Drop it first (mmtune convert split) or tailor an adapter without `include: [embed_tokens]`.")
    if adapter.extra:
        key = next(iter(adapter.extra))
        raise MMTuningError(f"{path}: holds tensors that are not LoRA factors (e.g. {key}: modules trained whole, "
                            f"DoRA magnitudes or LoRA biases), which a sparse delta cannot carry; tailor an adapter "
                            f"of plain LoRA modules.")


def _write(folder: Path, template: dict[str, Any], counts: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from ..methods.sparse import SparseDeltaConfig

    config = SparseDeltaConfig(target_modules=sorted(counts), counts=counts, inference_mode=True,
                               base_model_name_or_path=template.get("base_model_name_or_path"),
                               task_type=template.get("task_type"))
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
