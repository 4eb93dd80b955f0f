"""A third-party mmtuning plugin, as another package would ship it: adds Ovis2, which detection refuses
(its projector is `vision_tower.head_linear`, a module inside the vision tower with no telling name)."""

from mmtuning_plugin import hookimpl
from mmtuning_plugin.arch import ModalityMap

OVIS2 = ModalityMap(
    model_types=("ovis2",),
    vision=("model.vision_tower",),
    projector=("model.vision_tower.head_linear", "model.vision_tower.head_norm"),
    language=("model.language_model",),
    vision_layers=("model.vision_tower.transformer.encoder.layers",),
    language_layers=("model.language_model.layers",),
    source="mmtuning-ovis2 (example plugin)",
)


@hookimpl
def register_architectures(register):
    register(OVIS2)
