"""Sharding an mmtuning model: FSDP2 units, what FSDP and DeepSpeed ZeRO cannot take, a sharded run's save and
resume, and model-state memory per rank.

A run asks for FSDP2 the way its trainer reads it: `fsdp: full_shard` with `fsdp_config: {fsdp_version: 2}` in the
transformers `TrainingArguments` (Axolotl and LLaMA-Factory pass theirs through). On GPUs accelerate shards the
model itself. On CPU processes accelerate cannot: it wraps the model in DDP instead and shards nothing, silently.
There mmtuning shards the wrapped model itself, the way accelerate would (`fully_shard` on every numbered block of
each modality, then on the root), and the trainer mixin keeps accelerate from adding DDP on top. Either way the
plan, verification, schedules, keep and the losses run on every rank unchanged.

What this module adds for a model mmtuning sharded:
- the saved adapter is PEFT's plain format with full tensors (`gathered_state`; PEFT's own save fails on shards);
- a checkpoint holds each rank's own shards of the adapter and optimizer state (`save_rank_state`), so resuming
  on the same world size continues exactly where an uninterrupted run would be (`load_rank_state`).
Under ZeRO-3 DeepSpeed partitions, saves and resumes by itself; mmtuning only refuses what cannot work there.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .arch import MODALITIES, numbered_blocks, resolve_layout, unwrap
from .config import INITS
from .errors import MMTuningError

RANK_STATE = "mmtuning_fsdp"  # a checkpoint's folder of per-rank shards
# Calibrated inits write their frozen half back into each weight after every step: plain tensors, not shards.
UNSHARDABLE_INITS = tuple(init for init in INITS if init != "lora")


@dataclass(frozen=True)
class FsdpRequest:
    """What a run's training arguments ask for: FSDP `version`, and whether accelerate shards it itself."""

    version: int
    by_accelerate: bool
    options: dict[str, Any]


def fsdp_request(args: Any) -> FsdpRequest | None:
    """The FSDP a run's `TrainingArguments` ask for (None without `fsdp`)."""
    if args is None or not getattr(args, "fsdp", None):
        return None
    return fsdp_request_from({"fsdp": args.fsdp, "fsdp_config": getattr(args, "fsdp_config", None),
                              "use_cpu": getattr(args, "use_cpu", False)})


def fsdp_request_from(settings: Any) -> FsdpRequest | None:
    """The same from a host's YAML keys: `fsdp` (LLaMA-Factory, transformers) or `fsdp_version` (Axolotl), with
    `fsdp_config`. accelerate shards only on accelerator devices; on CPU processes (`use_cpu`, or no GPU) its FSDP
    plugin is never active."""
    options = dict(settings.get("fsdp_config") or {})
    if not (settings.get("fsdp") or settings.get("fsdp_version") or options.get("fsdp_version")):
        return None
    version = int(settings.get("fsdp_version") or options.get("fsdp_version") or options.get("version") or 1)
    on_cpu = bool(settings.get("use_cpu")) or not torch.cuda.is_available()
    return FsdpRequest(version, not on_cpu, options)


def fsdp_problems(request: FsdpRequest | None, config: Any) -> list[str]:
    """What cannot work under the requested FSDP, each naming both settings and what to write instead."""
    if request is None:
        return []
    problems = []
    if request.version == 1 and not request.by_accelerate:
        problems.append("fsdp with fsdp_version 1 on CPU processes: accelerate wraps the model in DDP instead and "
                        "shards nothing. Write fsdp_config: {fsdp_version: 2} (mmtuning shards the model with FSDP2 "
                        "itself where accelerate cannot), or train on GPUs")
    if request.version == 1 and str(request.options.get("use_orig_params", "true")).lower() == "false":
        problems.append("fsdp_config.use_orig_params: false flattens each unit into one parameter, which cannot mix "
                        "the frozen base weights with trainable adapters; write use_orig_params: true, or "
                        "fsdp_version: 2")
    quant = getattr(config, "quant", None)
    if quant is not None and quant.quant_type is not None and quant.storage_dtype == "uint8":
        problems.append("mmtuning.quant.quant_storage: uint8 under fsdp: FSDP shards a unit's parameters together, "
                        "and packed uint8 4-bit weights cannot sit with 16-bit ones; write quant_storage: auto (the "
                        "compute dtype, same bytes), or drop fsdp")
    inits = sorted({config.init_of(m) for m in MODALITIES if config.spec(m).enabled} & set(UNSHARDABLE_INITS))
    if inits:
        problems.append(f"mmtuning.init: {inits[0]} under fsdp: its frozen half is restored into each weight after "
                        f"every step, which a sharded weight cannot take yet; use init: lora with fsdp, or train "
                        f"without fsdp")
    spider = [m for m in MODALITIES if config.spec(m).enabled and config.spec(m).selective is not None
              and getattr(config.spec(m).selective, "method", None) == "spider"]
    if spider:
        problems.append(f"mmtuning.{spider[0]}.selective: spider under fsdp: its update mask multiplies full "
                        f"gradients, and sharded gradients are pieces; use selective: full, layernorm or bias with "
                        f"fsdp, or train without fsdp")
    return problems


def zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a run's `deepspeed` setting (a JSON file path or a dict; None without one)."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, (str, Path)):
        try:
            deepspeed = json.loads(Path(deepspeed).read_text())
        except (OSError, ValueError) as error:
            raise MMTuningError(f"deepspeed: {deepspeed}: cannot read it as a DeepSpeed JSON config ({error}); "
                                f"give the path of the JSON file.") from None
    stage = (deepspeed.get("zero_optimization") or {}).get("stage", 0) if isinstance(deepspeed, dict) else 0
    return int(stage) if str(stage).isdigit() else 0


def deepspeed_problems(stage: int | None, config: Any) -> list[str]:
    """What cannot work under DeepSpeed ZeRO (`stage` from zero_stage), naming both settings."""
    if stage is None:
        return []
    problems = []
    scheduled = [m for m in MODALITIES if config.spec(m).enabled and not _trains_from_the_start(config.spec(m).schedule)]
    if scheduled:
        problems.append(f"mmtuning.{scheduled[0]}.schedule under deepspeed: DeepSpeed builds its optimizer from the "
                        f"parameters that train at the start, so the layers of later stages would never train; drop "
                        f"the schedule (schedule: static), or shard with fsdp (fsdp_version: 2) instead")
    if stage == 3:
        problems += [problem.replace("under fsdp", "under deepspeed ZeRO-3").replace("or drop fsdp", "or use ZeRO-2")
                     .replace("train without fsdp", "train without ZeRO-3")
                     for problem in fsdp_problems(FsdpRequest(2, True, {}), config)]
    return problems


def _trains_from_the_start(schedule: Any) -> bool:
    """A schedule without later stages: `static`, or the projector's default (on from step 0, never off)."""
    kind = getattr(schedule, "type", schedule)  # a parsed schedule, or the value as written
    return kind in ("static", "always", None) or (kind == "projector" and not getattr(schedule, "start", None)
                                                  and getattr(schedule, "until", None) is None)


def check_fsdp(request: FsdpRequest | None, config: Any, where: str | None = None) -> None:
    """Refuse, before any training, what cannot work under the requested FSDP."""
    _refuse(fsdp_problems(request, config), where)


def check_deepspeed(stage: int | None, config: Any, where: str | None = None) -> None:
    """Refuse, before any training, what cannot work under DeepSpeed ZeRO."""
    _refuse(deepspeed_problems(stage, config), where)


def _refuse(problems: list[str], where: str | None) -> None:
    if problems:
        raise MMTuningError((f"{where}: " if where else "") + "; ".join(problems) + ".")


def shard_units(model: nn.Module) -> list[str]:
    """Names (in `model`) of the blocks to shard one by one: every numbered layer of each modality's stacks; the
    rest (embeddings, norms, a projector without layers, the head) goes with the root."""
    base = unwrap(model)
    prefix = next(name + "." for name, module in model.named_modules() if module is base) if base is not model else ""
    mmap = resolve_layout(model).modality_map
    return [prefix + name for modality in MODALITIES for name in numbered_blocks(base, mmap.layer_stacks(modality))]


def shard(model: nn.Module, mesh: Any = None) -> dict[str, Any]:
    """`fully_shard` on every unit of `shard_units` and on the root (FSDP2). The model's parameters become
    DTensors sharded across the process group's ranks; returns what the run report shows (`sharding`)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = shard_units(model)
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "generate"):  # keep's base answers: the root's own weights are gathered for generate too
        register_fsdp_forward_method(model, "generate")
    model.no_sync = functools.partial(gradient_sync_off, model)  # what accelerate calls between accumulated steps
    return sharding_summary(model, len(units) + 1, "mmtuning (fully_shard)")


@contextlib.contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """Micro-batches before the last of an accumulated step keep their gradients unreduced (one reduce-scatter per
    optimizer step instead of one per micro-batch), as accelerate does for the FSDP2 it builds itself."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sharding_summary(model: nn.Module, units: int | None, by: str) -> dict[str, Any]:
    """World size, units, and how many parameters are DTensors (all of them, right after sharding)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {"fsdp_version": 2, "sharded_by": by, "world_size": dist.get_world_size(), "units": units,
            "parameters": len(params), "sharded_parameters": sum(isinstance(p, DTensor) for p in params)}


def resharded(model: nn.Module) -> nn.Module:
    """The model with every unit back in its sharded state. FSDP2 leaves the root unit gathered after a forward
    until the next backward (the root does not reshard after forward), so after a forward outside training (keep's
    base answers) the root's parameters are plain full tensors: an optimizer built then, or a save, would hold
    those instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 manages the model (its root was `fully_shard`ed)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered_state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the state entries `names` (every rank must call it: each entry is gathered)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in resharded(model).state_dict().items():
        if name in names:
            out[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().to("cpu", copy=True)
    return out


def adapter_state_names(model: nn.Module, optimizer: Any = None) -> set[str]:
    """The state entries a sharded run saves: every PEFT-made tensor (adapter markers) and every parameter the
    optimizer holds (selective modules trained whole, adapters of later schedule stages)."""
    from .names import adapter_markers

    markers = adapter_markers()
    held = {id(p) for group in (optimizer.param_groups if optimizer is not None else []) for p in group["params"]}
    names = {name for name, p in model.named_parameters() if p.requires_grad or id(p) in held}
    return names | {name for name in model.state_dict() if any(marker in name for marker in markers)}


def save_rank_state(model: nn.Module, optimizer: Any, folder: Path) -> Path:
    """This rank's shards of the adapter state and of the optimizer state, in `folder/mmtuning_fsdp/rank<R>.pt`."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    names = adapter_state_names(resharded(model), optimizer)
    target = Path(folder) / RANK_STATE
    target.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    optim = optimizer.state_dict()
    local_optim = {**optim, "state": {k: {key: _local(v) if isinstance(v, torch.Tensor) else v
                                          for key, v in entry.items()} for k, entry in optim["state"].items()}}
    path = target / f"rank{rank}.pt"
    torch.save({"world_size": world, "rank": rank,
                "model": {name: _local(state[name]).detach().clone() for name in sorted(names)},
                "optimizer": local_optim}, path)
    if rank == 0:
        (target / "world.json").write_text(json.dumps({"world_size": world}) + "\n")
    return path


def has_rank_state(folder: Any) -> bool:
    return folder is not None and (Path(folder) / RANK_STATE / "world.json").is_file()


def load_rank_state(model: nn.Module, optimizer: Any, folder: Path) -> None:
    """Put this rank's saved shards back into the sharded model and its optimizer (same world size only)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    saved_world = json.loads((Path(folder) / RANK_STATE / "world.json").read_text())["world_size"]
    if saved_world != world:
        raise MMTuningError(f"{folder}: its shards were saved by {saved_world} processes and this run has {world}; "
                            f"resume with {saved_world} processes, or start from the checkpoint's gathered adapter "
                            f"(adapter_model.safetensors) without resuming.")
    saved = torch.load(Path(folder) / RANK_STATE / f"rank{rank}.pt", weights_only=False)
    state = resharded(model).state_dict()
    with torch.no_grad():
        for name, local in saved["model"].items():
            _local(state[name]).copy_(local)
    if optimizer is None:
        return
    optimizer.load_state_dict(saved["optimizer"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:  # load_state_dict leaves plain tensors; the step needs them as the parameter's DTensors
        entry = optimizer.state.get(param)
        if not entry or not isinstance(param, DTensor):
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                entry[key] = DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                                                run_check=False, shape=param.shape, stride=param.stride())


PREFETCHED_UNITS = 2  # FSDP2 gathers the running block and prefetches the next one


def per_rank_memory(model: nn.Module, plan: Any, world_size: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """Model-state bytes per rank under FSDP2 with `world_size` processes, next to one process (what
    `inspect-targets --world-size N` shows; activations not counted). Every weight, adapter, gradient and AdamW
    state is split N ways; at its peak a rank also holds whole the root unit (FSDP2 keeps the root gathered from
    its forward to its backward) and the two largest blocks (the running one and the prefetched one)."""
    from .config import QuantPolicy
    from .quant.memory import ADAM_STATE_BYTES, TRAINABLE_BYTES, weight_bytes

    policy = plan.config.quant or QuantPolicy.model_validate("none")
    weights, _ = weight_bytes(unwrap(model), policy, plan.layout, dtype)
    units = sorted(shard_units(model), key=len, reverse=True)
    by_unit: dict[str, int] = {}
    for name, (_, size) in weights.items():
        unit = next((u for u in units if name == u or name.startswith(u + ".")), "root")
        by_unit[unit] = by_unit.get(unit, 0) + size
    trainable = plan.trainable_params() or 0
    state = sum(by_unit.values()) + trainable * (TRAINABLE_BYTES + ADAM_STATE_BYTES)
    blocks = sorted((size for unit, size in by_unit.items() if unit != "root"), reverse=True)
    gathered = by_unit.get("root", 0) + sum(blocks[:PREFETCHED_UNITS])
    shard = -(-state // world_size)
    extra = gathered - -(-gathered // world_size) if world_size > 1 else 0
    largest = max((u for u in by_unit if u != "root"), key=by_unit.get, default=None)
    return {"world_size": world_size, "units": len(units) + 1, "one_process_bytes": state,
            "sharded_state_bytes": shard, "gathered_at_peak_bytes": extra, "per_rank_bytes": shard + extra,
            "root_unit_bytes": by_unit.get("root", 0), "largest_unit": largest,
            "largest_unit_bytes": by_unit.get(largest, 0) if largest else 0,
            "note": "model state only (weights after quantization, adapters, gradients, AdamW); activations not counted"}
