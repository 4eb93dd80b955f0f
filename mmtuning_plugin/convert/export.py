"""export: from one adapter, what a serving engine (vLLM) or plain transformers loads as it is.

- `vllm`: vLLM serves LoRA on the language model; LoRA on VLM towers and connectors only behind
  `--enable-tower-connector-lora` (older versions drop it with a warning), and it refuses `modules_to_save`,
  DoRA and ranks outside `VLLM_RANKS` (../shared FACTS, section 10). So the vision and projector deltas and
  every `modules_to_save` tensor are merged into a copy of the base (`OUT/base`), and `OUT/adapter` keeps the
  language modules only, with one r/alpha (vLLM reads neither `rank_pattern` nor `alpha_pattern`). With
  `tower_lora`, every LoRA module stays in the adapter (for vLLM's tower/connector flag) and only
  `modules_to_save` tensors are merged.
- `transformers`: one merged model directory (every modality), with the processor files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MMTuningError
from .adapter import CONFIG_FILE, Adapter, Factors, explicit_config, rank_alpha, read_adapter, write_adapter
from .base import extra_param_name
from .merge import check_model_dir, merge_into, parse_dtype
from .modality import Located
from .placement import safe_output

TARGETS = ("vllm", "transformers")
# LoRA ranks vLLM serves (FACTS section 10).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
BASE_DIR, ADAPTER_DIR = "base", "adapter"
# Files a processor or tokenizer is saved as: carried from beside the adapter when the base lacks them.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja")
# LoRA on these module kinds vLLM refuses in an adapter ("unsupported LoRA weight"): merged into the base copy.
VLLM_MERGED_KINDS = ("lm_head", "embed_tokens")
# adapter_config.json keys that select modules another way than the explicit list export writes.
SELECTORS_CLEARED = {"layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                     "target_parameters": None, "modules_to_save": None, "use_dora": False}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise MMTuningError(f"--for {target!r}: write --for vllm (an LM-only adapter plus a base copy with the tower "
                            f"and projector merged) or --for transformers (one merged model directory).")
    return target


def refuse_dora(adapter_dir: Path) -> None:
    """DoRA first, before the generic reader: neither vLLM nor convert's B@A arithmetic can carry it."""
    try:
        config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return  # read_adapter says what is wrong with the file
    if isinstance(config, dict) and config.get("use_dora") is True:
        raise MMTuningError(
            f"{adapter_dir} is a DoRA adapter (use_dora: true): vLLM serves no DoRA adapters, and its magnitude "
            f"vector is not a B@A delta that mmtune convert can merge. Merge it with PEFT instead "
            f"(`PeftModel.from_pretrained(base, ADAPTER).merge_and_unload().save_pretrained(OUT)`, then serve OUT "
            f"without LoRA), or train again with plain LoRA (`use_dora: false`).")


def nearest_ranks(rank: int) -> list[int]:
    """The allowed ranks next to `rank` (one below and one above, where they exist)."""
    below = [r for r in VLLM_RANKS if r < rank][-1:]
    above = [r for r in VLLM_RANKS if r > rank][:1]
    return below + above


def check_vllm_ranks(modules: dict[str, Factors], pad: bool) -> dict[str, int]:
    """Module -> the rank it is written with; a rank vLLM refuses is padded up (exact) or refused by name."""
    chosen, refused = {}, {}
    for name, factors in modules.items():
        rank = factors.rank
        above = [r for r in VLLM_RANKS if r >= rank]
        if rank in VLLM_RANKS or (pad and above):
            chosen[name] = above[0] if pad else rank
        else:
            refused.setdefault(rank, []).append(name)
    if refused:
        parts = []
        for rank, names in sorted(refused.items()):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            nearest = " or ".join(map(str, nearest_ranks(rank)))
            parts.append(f"rank {rank} ({shown}; nearest allowed: {nearest})")
        largest = max(refused)
        fix = ("pass --pad-ranks to pad each to the next allowed rank with zeros (exact, same outputs)"
               if largest < VLLM_RANKS[-1] else
               f"shrink it with `mmtune convert resize ADAPTER --rank {VLLM_RANKS[-1]} --out DIR` first")
        raise MMTuningError(f"vLLM serves LoRA ranks {', '.join(map(str, VLLM_RANKS))} only; these adapter modules "
                            f"have other ranks: {'; '.join(parts)}. Train with an allowed r (e.g. `r: "
                            f"{nearest_ranks(largest)[-1]}`), or {fix}.")
    return chosen


def padded(factors: Factors, rank: int) -> Factors:
    """The same delta at a higher rank: zero rows of A, zero columns of B."""
    extra = rank - factors.rank
    if extra == 0:
        return factors
    a = torch.cat([factors.a, factors.a.new_zeros(extra, *factors.a.shape[1:])], dim=0)
    b = torch.cat([factors.b, factors.b.new_zeros(factors.b.shape[0], extra, *factors.b.shape[2:])], dim=1)
    return Factors(a, b, factors.scaling, factors.embedding)


def vllm_adapter(located: Located, modules: dict[str, Factors], ranks: dict[str, int], base_out: Optional[str]) -> Adapter:
    """An adapter vLLM reads as PEFT does: one r and lora_alpha for every module (vLLM ignores rank_pattern and
    alpha_pattern). The user's r/alpha are kept where the modules share them; otherwise each module's scaling
    is folded into its B and written with alpha = r (scaling 1 in PEFT and in vLLM alike)."""
    source = located.adapter
    original = {located.current_name(m): m for m in source.modules}
    written = {m: padded(f, ranks[m]) for m, f in modules.items()}
    config = {**source.config, **SELECTORS_CLEARED}
    shared = {(f.rank, f.scaling) for f in modules.values()}
    if len(shared) == 1 and all(ranks[m] == f.rank for m, f in modules.items()):
        r, alpha = rank_alpha(source.config, original[next(iter(modules))])
        config.update(r=r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}, target_modules=sorted(modules))
    else:
        written = {m: Factors(f.a, f.b * f.scaling, 1.0, f.embedding) for m, f in written.items()}
        config = {**explicit_config(config, written), **SELECTORS_CLEARED}
        if len({f.rank for f in written.values()}) == 1:
            config.update(rank_pattern={}, alpha_pattern={})
    if base_out is not None:
        config["base_model_name_or_path"] = base_out
    return Adapter(source.path, config, written)


def processor_files(base_dir: Path, adapter_dir: Path, out: Path) -> list[str]:
    """Carry processor/tokenizer files saved beside the adapter when the base copy lacks them; list what `out` has."""
    for name in PROCESSOR_FILES:
        if (adapter_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(adapter_dir / name, out / name)
    return sorted(name for name in PROCESSOR_FILES if (out / name).is_file())


def _partition(located: Located, keep_lora: set[str]) -> tuple[dict[str, Factors], Adapter]:
    """(LoRA modules kept as an adapter, 5.x names) and the rest (to merge): modules of the other modalities,
    LoRA on lm_head or embed_tokens (vLLM loads none) and every extra (modules_to_save) tensor."""
    current = located.current
    stays = {m: located.base.modality(m) in keep_lora and located.base.kind(m) not in VLLM_MERGED_KINDS
             for m in current.modules}
    kept = {m: f for m, f in current.modules.items() if stays[m]}
    rest = {m: f for m, f in current.modules.items() if not stays[m]}
    return kept, Adapter(current.path, current.config, rest, dict(current.extra))


def _modalities(located: Located, adapter: Adapter) -> list[str]:
    names = {located.base.modality(m) for m in adapter.modules}
    names |= {located.base.modality(extra_param_name(k).rsplit(".", 1)[0]) for k in adapter.extra}
    return sorted(names)


def serve_command(base: str, adapter: Optional[str], max_rank: int, tower_lora: bool) -> str:
    if adapter is None:
        return f"vllm serve {base}"
    flags = " --enable-tower-connector-lora" if tower_lora else ""
    return f"vllm serve {base} --enable-lora --lora-modules mmtuning={adapter} --max-lora-rank {max_rank}{flags}"


def export(adapter_dir: Path, base_dir: Path, out: Path, target: str = "vllm", tower_lora: bool = False,
           pad_ranks: bool = False, dtype: str = "auto", force: bool = False, source: Optional[str] = None,
           progress: bool = True) -> dict[str, Any]:
    adapter_dir, base_dir, out = Path(adapter_dir), Path(base_dir), Path(out)
    check_target(target)
    if target == "transformers" and (tower_lora or pad_ranks):
        raise MMTuningError("--tower-lora and --pad-ranks shape the vLLM adapter; --for transformers merges every "
                            "module into one model. Drop them, or write --for vllm.")
    torch_dtype = parse_dtype(dtype)
    check_model_dir(base_dir, "--base")
    refuse_dora(adapter_dir)
    located = Located(read_adapter(adapter_dir), str(base_dir), source)
    keep_lora = set() if target == "transformers" else ({"vision", "projector", "language"} if tower_lora else {"language"})
    kept, rest = _partition(located, keep_lora)
    ranks = check_vllm_ranks(kept, pad_ranks) if kept else {}
    summary: dict[str, Any] = {"command": "export", "for": target, "adapter": str(adapter_dir), "base": str(base_dir),
                               "out": str(out), "model_type": located.base.model_type, "layout": located.layout,
                               "dtype": dtype}
    with safe_output(out, force, (adapter_dir, base_dir)) as temp:
        if target == "transformers":
            summary.update(_write_merged(located, rest, base_dir, adapter_dir, temp, torch_dtype, progress))
        else:
            summary.update(_write_vllm(located, kept, rest, ranks, tower_lora, base_dir, adapter_dir, out, temp,
                                       torch_dtype, progress))
    return _with_notes(summary)


def _write_merged(located: Located, rest: Adapter, base_dir: Path, adapter_dir: Path, temp: Path,
                  dtype: Optional[torch.dtype], progress: bool) -> dict[str, Any]:
    merged = merge_into(base_dir, temp, located.base, rest, dtype, progress=progress)
    return {"merged_modules": merged["merged_modules"], "replaced_tensors": merged["replaced_tensors"],
            "merged_modalities": _modalities(located, rest), "shards": merged["shards"],
            "bytes_written": merged["bytes_written"], "processor_files": processor_files(base_dir, adapter_dir, temp)}


def _write_vllm(located: Located, kept: dict[str, Factors], rest: Adapter, ranks: dict[str, int], tower_lora: bool,
                base_dir: Path, adapter_dir: Path, out: Path, temp: Path, dtype: Optional[torch.dtype],
                progress: bool) -> dict[str, Any]:
    base_out = adapter_out = None
    merged = {"merged_modules": 0, "replaced_tensors": 0, "bytes_written": 0}
    files: list[str] = []
    if rest.modules or rest.extra:
        (temp / BASE_DIR).mkdir()
        merged = merge_into(base_dir, temp / BASE_DIR, located.base, rest, dtype, progress=progress)
        files = processor_files(base_dir, adapter_dir, temp / BASE_DIR)
        base_out = str(out / BASE_DIR)
    if kept:
        absolute = str(out.resolve() / BASE_DIR) if base_out else None
        write_adapter(vllm_adapter(located, kept, ranks, absolute), temp / ADAPTER_DIR)
        adapter_out = str(out / ADAPTER_DIR)
    return {"tower_lora": tower_lora, "adapter_out": adapter_out, "adapter_modules": len(kept),
            "adapter_modalities": sorted({located.base.modality(m) for m in kept}),
            "ranks": sorted(set(ranks.values())),
            "padded_modules": sorted(m for m, f in kept.items() if ranks[m] != f.rank),
            "base_out": base_out, "merged_modules": merged["merged_modules"],
            "replaced_tensors": merged["replaced_tensors"], "merged_modalities": _modalities(located, rest),
            "bytes_written": merged["bytes_written"], "processor_files": files,
            "serve": serve_command(base_out or str(base_dir), adapter_out, max(ranks.values(), default=0), tower_lora)}


def _with_notes(summary: dict[str, Any]) -> dict[str, Any]:
    notes = []
    where = summary["base_out"] if summary["for"] == "vllm" else summary["out"]
    if where is not None and not summary["processor_files"]:
        notes.append(f"no tokenizer or processor files in {summary['base']} or beside the adapter: save the "
                     f"processor into {where} before serving (processor.save_pretrained)")
    if summary["for"] == "vllm" and summary["base_out"] is None:
        kept = "every LoRA module stays in the adapter" if summary["tower_lora"] else "the adapter has language LoRA only"
        notes.append(f"nothing to merge ({kept}, no modules_to_save): serve it on the original base")
    if summary["for"] == "vllm" and summary["adapter_out"] is None:
        notes.append("the adapter has no language LoRA: everything was merged, serve the base copy without --enable-lora")
    summary["notes"] = notes
    return summary
