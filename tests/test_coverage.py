"""Every image-text-to-text model type of the installed transformers resolves correctly or is refused with its
true reason. Meta device, default configs: ~1 s per type. CI also runs this file on the newest transformers
release (scripts/test), so a rename there shows up as a failing type, not as silently smaller adapters."""

import importlib.util
import re

import pytest
import transformers

from mmtuning_plugin import docgen
from mmtuning_plugin.arch import Refusal, registered
from mmtuning_plugin.arch.coverage import coverage_problems, default_skeleton, image_text_types, survey

TYPES = image_text_types()


@pytest.mark.parametrize("model_type", TYPES)
def test_type_resolves_or_is_refused_with_its_reason(model_type):
    result = survey(model_type)
    assert result.status != "incomplete", f"{model_type}: {result.reason}"
    if result.status == "refused":  # on purpose, never detection giving up
        assert isinstance(registered().get(model_type), Refusal), f"{model_type}: {result.reason}"
    if result.status == "unbuildable":  # transformers' own failure, and timm really missing where it says so
        if result.reason.startswith("needs timm"):
            assert importlib.util.find_spec("timm") is None
        else:
            assert result.reason.startswith("default config cannot be built")


def test_at_least_85_of_the_buildable_types_resolve_and_the_rest_are_refused():
    results = [survey(t) for t in TYPES]
    buildable = [r for r in results if r.status != "unbuildable"]
    resolved = [r for r in buildable if r.status == "resolved"]
    assert len(resolved) >= len(buildable) - 3 and len(resolved) >= 82, [r.model_type for r in buildable if r not in resolved]


def test_the_oracle_catches_a_map_that_misses_modules_or_misplaces_them():
    """The check fails on the right cause: drop the deepstack mergers (the bug qwen3_vl_moe had) or call the
    language model vision, and the problems name the modules."""
    from dataclasses import replace

    model = default_skeleton("qwen3_vl_moe")
    mmap = registered()["qwen3_vl_moe"]
    assert coverage_problems(model, mmap) == []
    missing = coverage_problems(model, replace(mmap, projector=("model.visual.merger",)))
    assert missing and all("deepstack_merger_list" in p and "no modality covers it" in p for p in missing)
    swapped = replace(mmap, vision=("model.visual", "model.language_model"), language=(),
                      vision_layers=("model.visual.blocks", "model.language_model.layers"), language_layers=())
    assert any("model.language_model.layers.0" in p and "placed as vision" in p for p in coverage_problems(model, swapped))


def test_audio_towers_are_never_vision_or_language():
    for model_type in ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "dots3_note"):
        if model_type not in TYPES:
            continue
        result = survey(model_type)
        assert result.status == "resolved", result.reason
        assert any("audio" in prefix for prefix in result.modality_map.excluded)


def test_docs_rows_match_the_survey():
    """docs/architectures.md is generated from this survey on the pinned transformers (docgen's drift test
    checks the whole file there); on another version, only the version line differs."""
    text = (docgen.DOCS / "architectures.md").read_text()
    pinned = re.search(r"auto mapping of transformers (\S+) ", text).group(1)
    if pinned != transformers.__version__:
        pytest.skip(f"docs were generated on transformers {pinned}; this run has {transformers.__version__}")
    assert text == docgen.architectures_markdown()


def test_vision_encoder_decoder_stacks_follow_the_encoder_and_decoder_types():
    """The generic wrapper resolves for the pairs its map knows (ViT + BERT, ViT + TrOCR) and names the
    unknown pair instead of guessing."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, VisionEncoderDecoderConfig

    from mmtuning_plugin.arch import resolve_layout
    from mmtuning_plugin.errors import MMTuningError

    def build(decoder):
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(AutoConfig.for_model("vit"), decoder)
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config)

    trocr = build(AutoConfig.for_model("trocr", d_model=768))
    assert coverage_problems(trocr) == []
    assert resolve_layout(trocr).modality_map.language_layers == ("decoder.model.decoder.layers",)
    with pytest.raises(MMTuningError, match="not 'gpt2'"):
        resolve_layout(build(AutoConfig.for_model("gpt2")))


@pytest.mark.parametrize("model_type", TYPES)
def test_the_defaults_work_on_every_buildable_type(model_type):
    """A user's first command, `mmtune inspect-targets TYPE` with no settings, exits 0 on every type that builds
    and resolves; a modality the model lacks (BLIP: no projector) is reported absent, not refused."""
    import json

    from typer.testing import CliRunner

    from mmtuning_plugin.cli import app

    if survey(model_type).status != "resolved":
        pytest.skip(f"{model_type}: {survey(model_type).status} ({survey(model_type).reason[:80]})")
    result = CliRunner().invoke(app, ["inspect-targets", model_type, "--json"])
    assert result.exit_code == 0, f"{model_type}: {result.output}"
    report = json.loads(result.stdout)
    for modality, row in report["modalities"].items():
        assert not (row["absent"] and row["enabled"]), modality
        if row["absent"]:
            assert row["targeted"] == [] and row["modules"] == [], modality
    assert report["plan"]["target_modules"] or report["plan"]["target_parameters"]
