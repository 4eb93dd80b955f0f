"""Real tokenizers and processors for the tiny models, and complete tiny checkpoints on disk.

Host integration tests (Axolotl, LLaMA-Factory) and the demo load models the way users do, from a
directory with weights, tokenizer, processor and chat template. These builders make such directories
from real classes (a `tokenizers` WordLevel model, transformers processors) without any download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Plain-text words first so ids are stable; special tokens sit at the ids the tiny configs expect.
BASE_WORDS: tuple[str, ...] = (
    "what", "is", "the", "shape", "colour", "color", "of", "in", "image", "a", "an", "how", "many", "are", "there",
    "left", "right", "top", "bottom", "center", "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    "circle", "square", "triangle", "star", "cross", "one", "two", "three", "four", "five", "six", "yes", "no",
    "describe", "picture", "this", "it", "shows", "where", "which", "side", "count", "shapes", "answer", "question",
    ".", ",", "?", ":", "user", "assistant", "system", "you", "helpful", "are", "and", "on", "at",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)
SPECIAL_IDS: dict[str, int] = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
VOCAB_SIZE = 320  # matches tiny.TEXT_SIZES["vocab_size"]


@dataclass(frozen=True)
class ProcessorFacts:
    """Per model type: the image-related special tokens (by id) a processor of that family expects."""

    image_tokens: dict[str, int]
    build: str  # name of the builder function below


# ids 300-303 are the image/video tokens of tiny.TINY_OVERRIDES
PROCESSOR_FACTS: dict[str, ProcessorFacts] = {
    "llava": ProcessorFacts({"<image>": 300}, "_llava_processor"),
    "qwen2_vl": ProcessorFacts({"<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302,
                                "<|vision_end|>": 303}, "_qwen2_vl_processor"),
    "qwen2_5_vl": ProcessorFacts({"<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302,
                                  "<|vision_end|>": 303}, "_qwen2_vl_processor"),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def tiny_tokenizer(image_tokens: dict[str, int], words: tuple[str, ...] = BASE_WORDS):
    """A WordLevel `PreTrainedTokenizerFast` with `VOCAB_SIZE` ids and the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_IDS)
    for word in words:
        if word not in vocab:
            vocab[word] = len(vocab)
    taken = set(vocab.values()) | set(image_tokens.values())
    for token, index in image_tokens.items():
        vocab[token] = index
    filler = (i for i in range(VOCAB_SIZE) if i not in taken)
    while len(vocab) < VOCAB_SIZE:
        index = next(filler)
        vocab[f"<extra_{index}>"] = index
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = [*SPECIAL_IDS, *image_tokens]
    model.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=[t for t in specials if t not in ("<pad>", "<unk>", "<s>", "<|im_end|>")],
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _llava_processor(config: Any, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token="<image>",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE.replace("{{ image_placeholder }}", "<image>"),
    )


def _qwen2_vl_processor(config: Any, tokenizer):
    import importlib.util

    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    from ..errors import MMTuningError

    if importlib.util.find_spec("torchvision") is None:  # its video processor is torchvision-only
        raise MMTuningError("A Qwen2-VL processor needs torchvision (for its video processor); install torchvision "
                            "in this environment or use a LLaVA-style tiny model.")

    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    images = Qwen2VLImageProcessor(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2},
    )
    template = CHAT_TEMPLATE.replace("{{ image_placeholder }}", "<|vision_start|><|image_pad|><|vision_end|>")
    # transformers <= 5.20 (Axolotl 0.21's pin) requires the video processor to be passed explicitly
    from transformers import Qwen2VLVideoProcessor

    videos = Qwen2VLVideoProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                   temporal_patch_size=vision.temporal_patch_size)
    return Qwen2VLProcessor(image_processor=images, video_processor=videos, tokenizer=tokenizer,
                            chat_template=template)


def tiny_processor(config: Any):
    """A real processor (tokenizer + image processor + chat template) matching a tiny config."""
    from ..errors import MMTuningError

    facts = PROCESSOR_FACTS.get(config.model_type)
    if facts is None:
        raise MMTuningError(f"No tiny processor recipe for '{config.model_type}'; known: {', '.join(PROCESSOR_FACTS)}.")
    tokenizer = tiny_tokenizer(facts.image_tokens)
    builder: Callable = globals()[facts.build]
    return builder(config, tokenizer)


def save_tiny_checkpoint(model_type: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A loadable model directory: random tiny weights, config, tokenizer, processor, chat template."""
    from .tiny import tiny_model

    path = Path(path)
    model = tiny_model(model_type, seed=seed, **overrides)
    processor = tiny_processor(model.config)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
