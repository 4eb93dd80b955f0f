"""docs/config.md and docs/architectures.md are generated from the code and must be up to date."""

from mmtuning_plugin import docgen
from mmtuning_plugin.arch import registered_maps
from mmtuning_plugin.config import MMTuningConfig, ModalitySpec


def test_committed_generated_docs_are_up_to_date():
    assert docgen.stale() == [], "run: python -m mmtuning_plugin.docgen"


def test_config_doc_lists_every_field_with_its_description():
    text = docgen.config_markdown()
    for model in (MMTuningConfig, ModalitySpec):
        for name, field in model.model_fields.items():
            assert f"| `{name}` |" in text
            assert field.description.split("`")[0][:30] in text
    assert "| `method` | str | `lora` |" in text and "## Adapter methods (`method:`)" in text
    assert "| `moe-lora` |" in text and "| `adapter` |" in text
    assert "| `vision` | [ModalitySpec](#modalityspec) | `{enabled: false}` |" in text


def test_check_mode_reports_a_stale_file(tmp_path):
    for name, build in docgen.GENERATED.items():
        (tmp_path / name).write_text(build())
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 0
    (tmp_path / "config.md").write_text("old text\n")
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 1


def test_architectures_doc_has_a_row_per_builtin_model_type():
    text = docgen.architectures_markdown()
    from mmtuning_plugin.arch.coverage import image_text_types

    # maps for types of newer transformers releases (hy_v4_vl: 5.24) have no row on an older one
    builtin = [t for t, m in registered_maps().items() if m.source == "builtin" and t in image_text_types()]
    assert len(builtin) > 50
    for model_type in builtin:
        assert f"| `{model_type}` |" in text
