"""The demo's tiny LLaVA: its config, its processor, encoding of synthetic items, and accuracy measured
by greedy generation.

Sizes are a little larger than `mmtuning_plugin.testing.tiny` so the model can actually learn colours, shapes and
positions from 24x24 images, yet small enough that pre-training and both demo arms run in minutes on 2 CPU
cores. Every Linear input width is a multiple of 64: bitsandbytes' CPU 4-bit inference path packs weights
in blocks of 64 along the input dimension and fails on other widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..keep.rows import left_padded
from .data import Item

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "tiny-llava-shapes"

# Overrides on top of tiny.tiny_config("llava"): facts about the demo model, in one table.
DEMO_SIZES: dict[str, Any] = {
    "text_config.hidden_size": 128,
    "text_config.intermediate_size": 256,
    "text_config.num_hidden_layers": 4,
    "text_config.num_attention_heads": 4,
    "text_config.num_key_value_heads": 2,
    "text_config.head_dim": 32,
    "vision_config.hidden_size": 64,
    "vision_config.intermediate_size": 128,
    "vision_config.num_hidden_layers": 4,
    "vision_config.num_attention_heads": 4,
    "vision_config.head_dim": 16,
    "vision_config.image_size": 24,
    "vision_config.patch_size": 8,
    "projector_hidden_act": "gelu",
}


def demo_config():
    from ..testing.tiny import tiny_config

    return tiny_config("llava", **DEMO_SIZES)


def build_random_model(seed: int):
    """The untrained demo model (pre-training starts here)."""
    from transformers import AutoModelForImageTextToText

    from ..testing.tiny import _randomize_zero_matrices

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(demo_config(), dtype=torch.float32)
    _randomize_zero_matrices(model)
    return model


def build_processor(config):
    from ..testing.tiny_processing import tiny_processor

    processor = tiny_processor(config)
    processor.tokenizer.padding_side = "left"
    return processor


def answer_word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    missing = [w for w, i in zip(words, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"answer words missing from the demo vocabulary: {missing}")
    return ids


@dataclass
class Encoded:
    """One item as model inputs: prompt ids (image tokens expanded), pixel values and the answer ids."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor
    answer_ids: list[int]
    answer: str
    kind: str = ""  # the question type (colour, shape, position): which skill the item measures


def encode(processor, items: Sequence[Item]) -> list[Encoded]:
    """Prompt ids, pixels and answer ids per item, as the processor writes them. The sets draw from a few
    hundred distinct pictures and a couple of questions, so each distinct picture, question and answer goes
    through the processor once (the demo encodes 8,000 training items per arm)."""
    from .data import TASKS

    kinds = {question: attribute for questions in TASKS.values() for question, attribute in questions}
    tokenizer = processor.tokenizer
    first_of = {item.key: item for item in reversed(items)}  # one item per distinct picture
    keys = list(first_of)
    pixels = dict(zip(keys, processor.image_processor(images=[first_of[k].image for k in keys],
                                                      return_tensors="pt")["pixel_values"]))
    prompts = {question: prompt_ids(processor, question, first_of[keys[0]].image)
               for question in dict.fromkeys(item.question for item in items)}
    answers = {answer: tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for answer in dict.fromkeys(item.answer for item in items)}
    return [Encoded(prompts[item.question], pixels[item.key], answers[item.answer], item.answer,
                    kinds.get(item.question, "")) for item in items]


def prompt_ids(processor, question: str, image) -> list[int]:
    """The chat-templated prompt (image, then the question) as the processor tokenizes it."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False,
    )
    return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()


def training_batch(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer sequences; only the answer (and its end token) carries labels."""
    length = max(len(r.prompt_ids) + len(r.answer_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r.prompt_ids + r.answer_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(r.prompt_ids): len(seq)] = torch.tensor(r.answer_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack([r.pixel_values for r in rows])}


def generation_batch(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    return {**left_padded([r.prompt_ids for r in rows], pad_id),
            "pixel_values": torch.stack([r.pixel_values for r in rows])}


@torch.no_grad()
def predict(model, tokenizer, rows: Sequence[Encoded], batch_size: int = 64, max_new_tokens: int = 3) -> list[str]:
    """Greedy generation; the prediction is the decoded text up to the end-of-turn token."""
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        inputs = generation_batch(chunk, tokenizer.pad_token_id)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            predictions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return predictions


def accuracy(predictions: Sequence[str], rows: Sequence[Encoded]) -> float:
    """Exact-match share of predictions (a generated answer must equal the expected word)."""
    from ..scoring import accuracy as scored

    return scored(predictions, [r.answer for r in rows], match="exact")
