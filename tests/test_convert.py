"""mmtune convert: legacy adapters converted and loaded strictly into transformers 5 models, merge/resize/
split/combine checked against PEFT's own forward pass. Tiny real models, real PEFT, no mocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mmtuning_plugin.convert.adapter import read_adapter
from mmtuning_plugin.convert.merge import FourBit, merge
from mmtuning_plugin.convert.remap import remap
from mmtuning_plugin.errors import MMTuningError
from mmtuning_plugin.testing.tiny import tiny_batch, tiny_model

# The documented old names (docs/convert.md, "Layouts"), written independently of convert/layouts.py:
# 5.x module name -> 4.52-4.57 name -> <=4.51 name.
TO_457 = {"llava": [(r"^model\.vision_tower\.", "model.vision_tower.vision_model.")], "qwen2_vl": [], "idefics3": []}
TO_451 = {
    "llava": [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head", "language_model.lm_head"),
              (r"^model\.vision_tower\.", "vision_tower.vision_model."), (r"^model\.multi_modal_projector\.", "multi_modal_projector.")],
    "qwen2_vl": [(r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model.")],
    "idefics3": [],
}
# every modality adapted: vision attention/MLP, projector, language attention
TARGETS = {
    "llava": r".*(vision_tower.*(q_proj|fc1)|multi_modal_projector\.linear_1|language_model.*(q_proj|v_proj))",
    "qwen2_vl": r".*(visual\.blocks.*(qkv|fc1)|visual\.merger\.mlp\.0|language_model.*(q_proj|v_proj))",
    "idefics3": r".*(vision_model.*(q_proj|fc1)|connector.*proj|text_model.*(q_proj|v_proj))",
}
PREFIX = "base_model.model."


def _legacy(key: str, rules) -> str:
    name = key[len(PREFIX):]
    for pattern, replacement in rules:
        name, count = re.subn(pattern, replacement, name, count=1)
        if count:
            break
    return PREFIX + name


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _inputs(model):
    inputs = dict(tiny_batch(model, 1, 6).inputs)
    inputs.pop("labels", None)
    return inputs


class Setup:
    """A tiny base saved to disk (sharded) and a 5.x adapter on it with random A and B."""

    def __init__(self, tmp: Path, model_type: str, targets: str | list[str] | None = None, r: int = 4, seed: int = 1,
                 modules_to_save=None, name: str = "adapter", rank_pattern=None):
        self.model_type = model_type
        self.base_dir = tmp / f"base-{model_type}"
        if not self.base_dir.exists():
            tiny_model(model_type).save_pretrained(self.base_dir, max_shard_size="200KB")
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or TARGETS[model_type], init_lora_weights=False,
                            modules_to_save=modules_to_save, rank_pattern=rank_pattern or {})
        self.peft = get_peft_model(tiny_model(model_type), config).eval()
        with torch.no_grad():  # make the LoRA contribution large enough to see in logits
            for n, p in self.peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        self.dir = tmp / name
        self.peft.save_pretrained(self.dir)
        cfg = json.loads((self.dir / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(self.base_dir)
        (self.dir / "adapter_config.json").write_text(json.dumps(cfg))
        self.inputs = _inputs(self.peft)
        self.logits = _logits(self.peft, self.inputs)

    def write_legacy(self, out: Path, rules) -> Path:
        out.mkdir()
        tensors = load_file(self.dir / "adapter_model.safetensors")
        save_file({_legacy(k, rules): v for k, v in tensors.items()}, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text((self.dir / "adapter_config.json").read_text())
        return out


def load_strict(model_type: str, adapter_dir: Path):
    """A fresh 5.x model with the adapter: every tensor of the file consumed, every LoRA weight loaded."""
    model = get_peft_model(tiny_model(model_type), LoraConfig.from_pretrained(str(adapter_dir))).eval()
    weights = load_peft_weights(str(adapter_dir))
    result = set_peft_model_state_dict(model, weights)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    lora_params = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora_params) == sum(1 for k in weights if "lora_" in k)
    return model


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "idefics3"])
def test_legacy_adapters_convert_and_load_strictly_with_equal_outputs(tmp_path, model_type):
    setup = Setup(tmp_path, model_type)
    rules_451 = TO_451[model_type]
    legacy_dirs = {"<=4.51": setup.write_legacy(tmp_path / "legacy451", rules_451),
                   "4.52-4.57": setup.write_legacy(tmp_path / "legacy457", TO_457[model_type])}
    for layout, legacy in legacy_dirs.items():
        out = tmp_path / f"converted-{layout.replace('<=', 'le')}"
        summary = remap(legacy, out)  # --from detected
        assert summary["to"] == "5.x"
        if {"<=4.51": rules_451, "4.52-4.57": TO_457[model_type]}[layout]:  # else the names equal 5.x ones
            assert summary["from"] == layout
        assert set(load_file(out / "adapter_model.safetensors")) == set(load_file(setup.dir / "adapter_model.safetensors"))
        loaded = load_strict(model_type, out)
        torch.testing.assert_close(_logits(loaded, setup.inputs), setup.logits)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_current_to_legacy_writes_exactly_the_documented_names(tmp_path, model_type):
    setup = Setup(tmp_path, model_type, modules_to_save=["lm_head"] if model_type == "llava" else None)
    originals = load_file(setup.dir / "adapter_model.safetensors")
    for layout, rules in (("<=4.51", TO_451[model_type]), ("4.52-4.57", TO_457[model_type])):
        out = tmp_path / layout.replace("<=", "le")
        remap(setup.dir, out, target=layout)
        written = load_file(out / "adapter_model.safetensors")
        assert set(written) == {_legacy(k, rules) for k in originals}
        back = tmp_path / f"back-{out.name}"
        remap(out, back, source=layout)
        assert set(load_file(back / "adapter_model.safetensors")) == set(originals)
    if model_type == "llava":  # projector LoRA and modules_to_save under their legacy names
        legacy = load_file(tmp_path / "le4.51" / "adapter_model.safetensors")
        assert any(k.startswith(PREFIX + "multi_modal_projector.linear_1.lora_A") for k in legacy)
        assert any(k.startswith(PREFIX + "vision_tower.vision_model.encoder.layers.0.") for k in legacy)
        assert json.loads((tmp_path / "le4.51" / "adapter_config.json").read_text())["modules_to_save"] == ["language_model.lm_head"]


def test_list_targets_and_rank_patterns_are_rewritten(tmp_path):
    names = ["model.language_model.layers.1.self_attn.q_proj", "model.multi_modal_projector.linear_1",
             "model.vision_tower.encoder.layers.0.mlp.fc1"]
    setup = Setup(tmp_path, "llava", targets=names, rank_pattern={"model.multi_modal_projector.linear_1": 2})
    legacy = tmp_path / "legacy"
    remap(setup.dir, legacy, target="<=4.51")
    config = json.loads((legacy / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["language_model.model.layers.1.self_attn.q_proj",
                                                       "multi_modal_projector.linear_1",
                                                       "vision_tower.vision_model.encoder.layers.0.mlp.fc1"])
    assert config["rank_pattern"] == {re.escape("multi_modal_projector.linear_1"): 2}
    back = tmp_path / "back"
    remap(legacy, back)
    loaded = load_strict("llava", back)
    torch.testing.assert_close(_logits(loaded, setup.inputs), setup.logits)


def test_wrong_base_and_bad_files_are_refused_without_touching_inputs(tmp_path):
    setup = Setup(tmp_path, "llava")
    before = (setup.dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(MMTuningError, match="do not fit"):  # a qwen2_vl base cannot hold llava modules
        remap(setup.dir, tmp_path / "x", base="qwen2_vl", source="5.x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MMTuningError, match="--force"):
        remap(setup.dir, tmp_path / "exists")
    with pytest.raises(MMTuningError, match="overlaps"):
        remap(setup.dir, setup.dir / "inside")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((setup.dir / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(before[: len(before) // 2])
    with pytest.raises(MMTuningError, match="truncated or corrupt"):
        remap(broken, tmp_path / "y")
    assert (setup.dir / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


def test_mismatched_ranks_are_refused(tmp_path):
    setup = Setup(tmp_path, "llava")
    tensors = load_file(setup.dir / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, setup.dir / "adapter_model.safetensors")
    with pytest.raises(MMTuningError, match="mismatched ranks"):
        read_adapter(setup.dir)


def test_merge_matches_peft_logits_and_streams_shards(tmp_path):
    from transformers import AutoModelForImageTextToText

    setup = Setup(tmp_path, "qwen2_vl")
    legacy = setup.write_legacy(tmp_path / "legacy", TO_451["qwen2_vl"])  # merge reads legacy adapters too
    summary = merge(legacy, setup.base_dir, tmp_path / "merged", progress=False)
    assert summary["shards"] > 1 and summary["merged_modules"] == len(read_adapter(setup.dir).modules)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, setup.inputs), setup.logits, atol=1e-4, rtol=1e-4)
    base = AutoModelForImageTextToText.from_pretrained(setup.base_dir).eval()
    assert not torch.allclose(_logits(base, setup.inputs), setup.logits, atol=1e-3)
    # a truncated base shard: exit-2 error, nothing written
    import shutil
    broken = tmp_path / "broken-base"
    shutil.copytree(setup.base_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MMTuningError, match="truncated"):
        merge(setup.dir, broken, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))  # temp sibling removed
    with pytest.raises(MMTuningError, match="not the adapter's base"):  # same type, other checkpoint spelling
        other = tmp_path / "other-base"
        shutil.copytree(setup.base_dir, other)
        index = json.loads((other / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k.replace("layers.0.", "layers.9."): v for k, v in index["weight_map"].items()}
        (other / "model.safetensors.index.json").write_text(json.dumps(index))
        merge(setup.dir, other, tmp_path / "never", progress=False)


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {m: f.delta() for m, f in read_adapter(adapter_dir).modules.items()}


def test_resize_full_rank_is_lossless_and_error_shrinks_with_rank(tmp_path):
    from mmtuning_plugin.convert.resize import resize

    setup = Setup(tmp_path, "llava", r=8)
    full = resize(setup.dir, tmp_path / "r8", rank=8)
    assert full["total_relative_error"] < 1e-5
    loaded = load_strict("llava", tmp_path / "r8")
    torch.testing.assert_close(_logits(loaded, setup.inputs), setup.logits, atol=1e-4, rtol=1e-4)
    errors = [resize(setup.dir, tmp_path / f"r{r}", rank=r)["total_relative_error"] for r in (1, 2, 4, 6)]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] > 1e-3
    small = read_adapter(tmp_path / "r2")
    assert {f.rank for f in small.modules.values()} == {2}
    load_strict("llava", tmp_path / "r2")


def test_resize_per_modality_uses_the_modality_map(tmp_path):
    from mmtuning_plugin.convert.resize import resize

    setup = Setup(tmp_path, "qwen2_vl", r=8)
    legacy = setup.write_legacy(tmp_path / "legacy", TO_451["qwen2_vl"])
    summary = resize(legacy, tmp_path / "mixed", per_modality="vision=2,language=6")
    ranks = {row["module"]: row["rank_to"] for row in summary["modules"]}
    assert ranks["visual.blocks.0.attn.qkv"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 6
    assert ranks["visual.merger.mlp.0"] == 8  # projector not named, no --rank: kept
    assert summary["ranks"] == {"vision": [2], "projector": [8], "language": [6]}
    with pytest.raises(MMTuningError, match="per-modality"):
        resize(legacy, tmp_path / "bad", per_modality="audio=2")


def test_split_keeps_language_and_merges_the_rest_into_a_base_copy(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.convert.split import split

    setup = Setup(tmp_path, "llava")
    summary = split(setup.dir, tmp_path / "lang", keep="language", merge_rest_into=setup.base_dir, progress=False)
    assert summary["dropped_modalities"] == ["projector", "vision"]
    kept = read_adapter(tmp_path / "lang").modules
    assert kept and all(m.startswith("model.language_model.") for m in kept)
    # merged vision+projector base + language-only adapter == the original adapter on the original base
    merged_base = AutoModelForImageTextToText.from_pretrained(tmp_path / "lang" / "merged_base").eval()
    model = get_peft_model(merged_base, LoraConfig.from_pretrained(str(tmp_path / "lang"))).eval()
    result = set_peft_model_state_dict(model, load_peft_weights(str(tmp_path / "lang")))
    assert result.unexpected_keys == []
    torch.testing.assert_close(_logits(model, setup.inputs), setup.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(MMTuningError, match="nothing to split"):
        split(tmp_path / "lang", tmp_path / "again", keep="language")


def test_combine_linear_weights_one_zero_equals_first_and_sums_deltas(tmp_path):
    from mmtuning_plugin.convert.combine import combine

    first = Setup(tmp_path, "llava", r=4, seed=1, name="first")
    second = Setup(tmp_path, "llava", r=2, seed=2, name="second",
                   targets=r".*language_model.*(q_proj|k_proj)")  # different rank and modules
    combine([first.dir, second.dir], tmp_path / "only-first", weights=[1, 0])
    loaded = load_strict("llava", tmp_path / "only-first")
    torch.testing.assert_close(_logits(loaded, first.inputs), first.logits, atol=1e-5, rtol=1e-5)
    summary = combine([first.dir, second.dir], tmp_path / "sum", weights=[0.5, 2.0])
    d1, d2, combined = _deltas(first.dir), _deltas(second.dir), _deltas(tmp_path / "sum")
    for module in set(d1) | set(d2):
        expected = 0.5 * d1.get(module, 0) + 2.0 * d2.get(module, 0)
        torch.testing.assert_close(combined[module], expected, atol=1e-5, rtol=1e-5)
    assert 6 in summary["ranks"]  # q_proj in both: concatenated 4 + 2
    load_strict("llava", tmp_path / "sum")
    truncated = combine([first.dir, second.dir], tmp_path / "sum-r4", weights=[0.5, 2.0], rank=4)
    assert truncated["ranks"] == [2, 4] and truncated["total_svd_relative_error"] > 0.01
    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    best = torch.linalg.svdvals(combined[q_proj])  # the truncation is the best rank-4 approximation
    error = torch.linalg.matrix_norm(_deltas(tmp_path / "sum-r4")[q_proj] - combined[q_proj])
    torch.testing.assert_close(error, best[4:].norm(), atol=1e-4, rtol=1e-3)


def test_combine_ties_and_dare(tmp_path):
    from mmtuning_plugin.convert.combine import combine

    first = Setup(tmp_path, "idefics3", r=4, seed=1, name="first")
    second = Setup(tmp_path, "idefics3", r=4, seed=2, name="second")
    d1, d2 = _deltas(first.dir), _deltas(second.dir)
    module = next(iter(d1))
    s = combine([first.dir, second.dir], tmp_path / "ties", method="ties", weights=[1, 1], density=1.0, rank=64)
    agree = torch.sign(d1[module]) == torch.sign(d2[module])
    got = _deltas(tmp_path / "ties")[module]  # density 1: agreeing entries averaged, others take the winner
    torch.testing.assert_close(got[agree], ((d1[module] + d2[module]) / 2)[agree], atol=1e-4, rtol=1e-4)
    assert s["total_svd_relative_error"] < 1e-5
    dare = combine([first.dir, second.dir], tmp_path / "dare", method="dare_linear", weights=[1, 1], density=0.5)
    assert dare["ranks"] == [4] and dare["total_svd_relative_error"] > 0.1  # random drop makes it full rank
    load_strict("idefics3", tmp_path / "dare")
    qwen = Setup(tmp_path, "qwen2_vl", name="qwen")
    with pytest.raises(MMTuningError, match="different base models"):
        combine([first.dir, qwen.dir], tmp_path / "x")
    with pytest.raises(MMTuningError, match="do not fit"):  # checked against one base, the qwen adapter does not fit
        combine([first.dir, qwen.dir], tmp_path / "x", base=str(first.base_dir))


def test_merge_into_dequantized_4bit_weights_reproduces_the_qlora_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    setup = Setup(tmp_path, "llava")
    # the tiny vision tower (32 features) is below bitsandbytes' CPU block size: keep it (and lm_head) 16-bit
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    four_bit_base = AutoModelForImageTextToText.from_pretrained(setup.base_dir, quantization_config=quantization)
    assert any(type(m).__name__ == "Linear4bit" for m in four_bit_base.modules())
    qlora = _logits(PeftModel.from_pretrained(four_bit_base, str(setup.dir)).eval(), setup.inputs)
    summary = merge(setup.dir, setup.base_dir, tmp_path / "dq", four_bit=FourBit("nf4", skip=tuple(skip)), progress=False)
    assert summary["dequantized_4bit_weights"] > summary["merged_modules"]  # every quantized Linear, not only adapted ones
    merge(setup.dir, setup.base_dir, tmp_path / "plain", progress=False)
    dequantized = _logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "dq").eval(), setup.inputs)
    plain = _logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "plain").eval(), setup.inputs)
    error_dq, error_plain = (dequantized - qlora).abs().max(), (plain - qlora).abs().max()
    # bitsandbytes' CPU 4-bit kernel keeps the block scales in bf16, hence 1e-2 rather than float precision
    assert error_dq < 1e-2 and error_plain > 10 * error_dq


def test_cli_subcommands_print_json_and_fail_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    runner = CliRunner()
    setup = Setup(tmp_path, "llava")

    def run(*args, code=0):
        result = runner.invoke(app, ["convert", *map(str, args)])
        assert result.exit_code == code, result.output
        return result

    legacy = json.loads(run("remap", setup.dir, "--out", tmp_path / "old", "--to", "<=4.51", "--json").stdout)
    assert legacy["from"] == "5.x" and legacy["to"] == "<=4.51"
    assert json.loads(run("remap", tmp_path / "old", "--out", tmp_path / "new", "--json").stdout)["from"] == "<=4.51"
    assert json.loads(run("merge", tmp_path / "old", "--base", setup.base_dir, "--out", tmp_path / "m", "--dtype", "bf16",
                          "--json").stdout)["merged_modules"] == legacy["modules"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    resized = json.loads(run("resize", setup.dir, "--rank", "2", "--out", tmp_path / "r", "--json").stdout)
    assert 0 < resized["total_relative_error"] < 1
    assert json.loads(run("split", setup.dir, "--keep", "language,projector", "--out", tmp_path / "s",
                          "--json").stdout)["dropped_modalities"] == ["vision"]
    combined = json.loads(run("combine", setup.dir, tmp_path / "new", "--weights", "1,0", "--out", tmp_path / "c",
                              "--json").stdout)
    assert combined["ranks"] == [4]
    failed = run("remap", setup.dir, "--out", tmp_path / "new", code=2)  # exists, no --force
    assert "--force" in failed.output and "Traceback" not in failed.output
    run("remap", setup.dir, "--out", tmp_path / "new", "--force")
    assert "Traceback" not in run("resize", setup.dir, "--rank", "2", "--per-modality", "vision=x", "--out",
                                  tmp_path / "bad", code=2).output
    assert "nf4 or fp4" in run("merge", setup.dir, "--base", setup.base_dir, "--out", tmp_path / "q",
                               "--dequantize-4bit", "int3", code=2).output


def test_merge_replaces_modules_to_save_and_split_keeps_them_with_their_modality(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.convert.split import split

    setup = Setup(tmp_path, "llava", modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained copy of lm_head that differs from the base
        saved = next(m for n, m in setup.peft.named_modules() if n.endswith("lm_head.modules_to_save.default"))
        saved.weight.add_(0.5)
    setup.peft.save_pretrained(setup.dir)
    config = json.loads((setup.dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(setup.base_dir)
    (setup.dir / "adapter_config.json").write_text(json.dumps(config))
    logits = _logits(setup.peft, setup.inputs)
    assert merge(setup.dir, setup.base_dir, tmp_path / "merged", progress=False)["replaced_tensors"] == 1
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, setup.inputs), logits, atol=1e-4, rtol=1e-4)
    summary = split(setup.dir, tmp_path / "lang", keep="language")
    assert summary["dropped_extra_tensors"] == 0 and summary["lost_without_merge"]
    assert json.loads((tmp_path / "lang" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    load_strict("llava", tmp_path / "lang")


def test_split_keeps_qwen_merger_norm_with_the_projector(tmp_path):
    """Qwen's projector `model.visual.merger` sits inside the vision tower `model.visual`: its LayerNorm `ln_q`
    (trained whole through modules_to_save) is projector, so --keep projector,language keeps it (longest prefix)."""
    from mmtuning_plugin.convert.split import split

    setup = Setup(tmp_path, "qwen2_vl", targets=r".*(visual\.blocks.*(qkv|fc1)|language_model.*(q_proj|v_proj))",
                  modules_to_save=["merger"])
    saved = set(load_file(setup.dir / "adapter_model.safetensors"))
    merger = sorted(k for k in saved if ".merger." in k)
    assert any(".ln_q." in k for k in merger) and any(".mlp." in k for k in merger)
    summary = split(setup.dir, tmp_path / "s", keep="projector,language")
    assert summary["dropped_modalities"] == ["vision"] and summary["dropped_extra_tensors"] == 0
    kept = set(load_file(tmp_path / "s" / "adapter_model.safetensors"))
    assert set(merger) <= kept
    assert not any(".visual.blocks." in k for k in kept)
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["modules_to_save"] == ["merger"]
    load_strict("qwen2_vl", tmp_path / "s")


def test_layout_tables_round_trip_every_module_of_every_family():
    """5.x -> older -> 5.x gives back every module name, and older layouts really differ where docs/convert.md says so."""
    from mmtuning_plugin.convert.layouts import LAYOUTS, family_of, rename
    from mmtuning_plugin.loading import build_skeleton
    from mmtuning_plugin.testing.tiny import TINY_MODEL_TYPES, tiny_config

    for family in {family_of(t) for t in TINY_MODEL_TYPES}:  # the history lives in each type's modality map
        for model_type in [t for t in family.model_types if t in TINY_MODEL_TYPES]:
            # the bare top-level `model` was the text decoder in <=4.51 Qwen2-VL: no adapter targets it
            names = [n for n, _ in build_skeleton(tiny_config(model_type)).named_modules() if n not in ("", "model")]
            for layout in LAYOUTS:
                if layout in family.absent:
                    continue
                old = [rename(n, family, "5.x", layout) for n in names]
                assert len(set(old)) == len(names)
                assert [rename(n, family, layout, "5.x") for n in old] == names, (model_type, layout)
    llava = family_of("llava")
    assert rename("model.vision_tower.encoder.layers.0.mlp.fc1", llava, "5.x", "<=4.51") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1"
    assert rename("lm_head", llava, "5.x", "<=4.51") == "language_model.lm_head"


def _greedy(model, model_dir: Path, image) -> list[int]:
    """Ten greedy tokens for one image question, with the processor saved in `model_dir` (as a server reads it)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is in the image ?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    return tokens[0, batch["input_ids"].shape[1]:].tolist()


def test_export_for_vllm_and_transformers_decodes_like_the_original_adapter(tmp_path):
    """Greedy decoding in transformers: base + original adapter (vision, projector, language LoRA, vision at another
    rank) == the `--for transformers` merged model == the `--for vllm` base copy + LM-only adapter, token for token."""
    import numpy as np
    from PIL import Image
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.convert.export import export
    from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

    base_dir = save_tiny_checkpoint("llava", tmp_path / "base")
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS["llava"], init_lora_weights=False,
                        rank_pattern={r"model\.vision_tower\..*": 4}, alpha_pattern={r"model\.vision_tower\..*": 4})
    original = get_peft_model(AutoModelForImageTextToText.from_pretrained(base_dir), config).eval()
    with torch.no_grad():  # non-zero B everywhere, large enough to change greedy tokens
        for name, p in original.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    original.save_pretrained(tmp_path / "adapter")
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    expected = _greedy(original, base_dir, image)
    with original.disable_adapter():
        assert _greedy(original, base_dir, image) != expected  # the deltas matter: the test can fail

    merged = export(tmp_path / "adapter", base_dir, tmp_path / "hf", "transformers", progress=False)
    assert merged["merged_modalities"] == ["language", "projector", "vision"] and merged["merged_modules"] == 17
    assert "tokenizer.json" in merged["processor_files"] and "processor_config.json" in merged["processor_files"]
    merged_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert _greedy(merged_model, tmp_path / "hf", image) == expected

    served = export(tmp_path / "adapter", base_dir, tmp_path / "vllm", "vllm", progress=False)
    assert (served["adapter_modalities"], served["merged_modalities"]) == (["language"], ["projector", "vision"])
    assert served["ranks"] == [8] and "--max-lora-rank 8" in served["serve"]
    written = json.loads((tmp_path / "vllm" / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"], written["modules_to_save"]) == (8, 16, {}, None)
    assert all(".language_model." in m for m in written["target_modules"])
    base_copy = AutoModelForImageTextToText.from_pretrained(tmp_path / "vllm" / "base")
    lm_only = PeftModel.from_pretrained(base_copy, tmp_path / "vllm" / "adapter").eval()
    assert _greedy(lm_only, tmp_path / "vllm" / "base", image) == expected
    # the tower and projector deltas live in the base copy: the LM-only adapter on the bare base decodes otherwise
    bare = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), tmp_path / "vllm" / "adapter")
    assert _greedy(bare.eval(), base_dir, image) != expected
    # the merged directory holds PEFT's own merge_and_unload, weight for weight
    peft_merged = original.merge_and_unload().state_dict()
    ours = merged_model.state_dict()
    assert set(ours) == set(peft_merged)
    for name, tensor in peft_merged.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_export_for_vllm_merges_lora_on_lm_head_into_the_base_copy(tmp_path):
    """vLLM refuses LoRA on lm_head ("unsupported LoRA weight"; PEFT also saves lm_head's base weight beside it): the export
    merges it into the base copy with the towers, the adapter keeps the layers' LoRA, and the pair computes the
    original adapter's logits, and so does the `--for transformers` merge."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.convert.export import export

    targets = rf"{TARGETS['llava']}|lm_head"
    setup = Setup(tmp_path, "llava", targets=targets, r=8)
    assert any(n.endswith("lm_head.lora_B.default.weight") for n, _ in setup.peft.named_parameters())
    served = export(setup.dir, setup.base_dir, tmp_path / "vllm", "vllm", progress=False)
    written = json.loads((tmp_path / "vllm" / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] and not [m for m in written["target_modules"] if "lm_head" in m]
    assert all(".language_model.layers." in m for m in written["target_modules"])
    assert "language" in served["merged_modalities"] and served["adapter_modalities"] == ["language"]
    base_copy = AutoModelForImageTextToText.from_pretrained(tmp_path / "vllm" / "base")
    model = PeftModel.from_pretrained(base_copy, tmp_path / "vllm" / "adapter").eval()
    torch.testing.assert_close(_logits(model, setup.inputs), setup.logits, atol=1e-4, rtol=1e-4)
    export(setup.dir, setup.base_dir, tmp_path / "hf", "transformers", progress=False)  # the delta on the saved base
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(merged, setup.inputs), setup.logits, atol=1e-4, rtol=1e-4)


def test_export_for_vllm_pads_ranks_merges_modules_to_save_and_keeps_tower_lora_when_asked(tmp_path):
    """Rank 4 is refused by name (vLLM serves 1, 8, 16, ...); --pad-ranks pads it with zeros (exact); a
    modules_to_save tensor lands in the base copy; --tower-lora keeps every LoRA module, mixed ranks folded to
    one r/alpha. Each artifact, loaded by PEFT, computes the original adapter's logits."""
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.convert.export import export

    setup = Setup(tmp_path, "llava", r=4, modules_to_save=["lm_head"], rank_pattern={r"model\.vision_tower\..*": 1})
    with torch.no_grad():  # a trained copy of lm_head that differs from the base
        next(m for n, m in setup.peft.named_modules() if n.endswith("lm_head.modules_to_save.default")).weight.add_(0.5)
    setup.peft.save_pretrained(setup.dir)
    config = json.loads((setup.dir / "adapter_config.json").read_text())
    (setup.dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(setup.base_dir)}))
    expected = _logits(setup.peft, setup.inputs)
    with pytest.raises(MMTuningError) as refused:
        export(setup.dir, setup.base_dir, tmp_path / "never", "vllm", progress=False)
    message = " ".join(str(refused.value).split())
    assert "rank 4 (model.language_model.layers.0.self_attn.q_proj" in message and "nearest allowed: 1 or 8" in message
    assert "--pad-ranks" in message and not (tmp_path / "never").exists()

    def served(out: Path) -> torch.Tensor:
        base_copy = AutoModelForImageTextToText.from_pretrained(out / "base")
        model = get_peft_model(base_copy, LoraConfig.from_pretrained(str(out / "adapter"))).eval()
        result = set_peft_model_state_dict(model, load_peft_weights(str(out / "adapter")))
        assert result.unexpected_keys == [] and not [k for k in result.missing_keys if "lora_" in k]
        return _logits(model, setup.inputs)

    lm = export(setup.dir, setup.base_dir, tmp_path / "lm", "vllm", pad_ranks=True, progress=False)
    assert (lm["ranks"], len(lm["padded_modules"]), lm["replaced_tensors"]) == ([8], 8, 1)
    written = json.loads((tmp_path / "lm" / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"], written["modules_to_save"]) == (8, 8, {}, None)
    torch.testing.assert_close(served(tmp_path / "lm"), expected, atol=1e-4, rtol=1e-4)

    tower = export(setup.dir, setup.base_dir, tmp_path / "tower", "vllm", tower_lora=True, pad_ranks=True, progress=False)
    assert tower["adapter_modalities"] == ["language", "projector", "vision"] and tower["ranks"] == [1, 8]
    assert (tower["merged_modules"], tower["replaced_tensors"]) == (0, 1)
    assert "--enable-tower-connector-lora" in tower["serve"] and "--max-lora-rank 8" in tower["serve"]
    written = json.loads((tmp_path / "tower" / "adapter" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == written["r"] == 8  # scaling 1 in vLLM, which reads no alpha_pattern
    torch.testing.assert_close(served(tmp_path / "tower"), expected, atol=1e-4, rtol=1e-4)
