"""Keep rows: a keep prompt under the run's own chat template, as token ids plus per-image processor tensors.

Two ways to get the image part, both through the run's processor:
- image files / keep data: the processor encodes text and images together, as the host does for training;
- `images: train`: the training batch's own images, already processed. The prompt is tokenized with one
  image token per image (as the chat template writes it) and each is widened to the run of image tokens that
  image has in the training batch, so no image is processed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import MMTuningError

Render = Callable[[list[dict[str, Any]]], str]  # chat messages -> the prompt text, generation prompt included


@dataclass
class KeepRow:
    prompt_ids: list[int]
    images: list[dict[str, torch.Tensor]]  # per-image processor tensors (pixel_values, image_grid_thw, ...)
    text: str  # the rendered prompt, for the log
    answer_ids: list[int] = field(default_factory=list)  # the base's greedy answer (target `answers`)
    question: str = ""  # the keep prompt or user turn itself, for the log
    image_row: int | None = None  # the training row whose image it asks about (images: train), for packing


def user_messages(prompt: str, images: int) -> list[dict[str, Any]]:
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def conversation_messages(text: str, images: int) -> list[dict[str, Any]]:
    """A keep-data user turn; `<image>` marks become image parts where they stand (else images come first)."""
    from .sources import IMAGE_PLACEHOLDER

    if IMAGE_PLACEHOLDER not in text:
        return user_messages(text, images)
    content: list[dict[str, Any]] = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def template_renderer(processor: Any, chat_template: str | None = None) -> Render:
    """The run's chat template as a function; a host with its own templating passes `render` instead."""
    owner = processor if hasattr(processor, "apply_chat_template") else getattr(processor, "tokenizer", None)
    template = chat_template or getattr(owner, "chat_template", None) or \
        getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if owner is None or not template:
        raise MMTuningError("mmtuning.keep: the processor has no chat template, so keep prompts cannot be written the "
                            "way the model is trained; pass the run's template (prepare_keep(..., chat_template=...) "
                            "or render=...).")

    def render(messages: list[dict[str, Any]]) -> str:
        return owner.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)

    return render


def tokenizer_of(processor: Any):
    return getattr(processor, "tokenizer", processor)


# --- per-image tensors of a processed batch -------------------------------------------------------------


def image_entries(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The processor tensors of each image in a batch, in order (LLaVA-style stacked pixels, or Qwen-style
    flattened patches with `image_grid_thw`)."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return []
    grid = batch.get("image_grid_thw")
    if grid is not None:
        chunks = pixels.split([int(n) for n in grid.prod(-1).tolist()])
        return [{"pixel_values": chunk, "image_grid_thw": thw} for chunk, thw in zip(chunks, grid)]
    extra = [k for k in ("image_sizes",) if k in batch]
    return [{"pixel_values": pixels[i], **{k: batch[k][i] for k in extra}} for i in range(pixels.shape[0])]


def collate_images(entries: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not entries:
        return {}
    if "image_grid_thw" in entries[0]:
        return {"pixel_values": torch.cat([e["pixel_values"] for e in entries]),
                "image_grid_thw": torch.stack([e["image_grid_thw"] for e in entries])}
    return {key: torch.stack([e[key] for e in entries]) for key in entries[0]}


def image_runs(ids: Sequence[int], image_id: int) -> list[int]:
    """Lengths of the runs of image tokens in one row: one run per image."""
    runs, length = [], 0
    for token in ids:
        if token == image_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    if length:
        runs.append(length)
    return runs


def training_images(batch: dict[str, Any], image_id: int | None) -> list[tuple[dict[str, torch.Tensor], int]]:
    """(per-image tensors, image tokens) of every image of a collated training batch."""
    entries = image_entries(batch)
    if not entries:
        return []
    ids = batch.get("input_ids")
    if ids is None or image_id is None:
        raise MMTuningError("mmtuning.keep.images: `train` needs input_ids in the training batch and an image token "
                            "id in the model config; write `images:` as a folder of images instead.")
    mask = batch.get("attention_mask")
    runs = []
    for row, row_ids in enumerate(ids.tolist()):
        if mask is not None:
            row_ids = [t for t, m in zip(row_ids, mask[row].tolist()) if m]
        runs += image_runs(row_ids, image_id)
    if len(runs) != len(entries):
        raise MMTuningError(f"mmtuning.keep.images: the training batch has {len(entries)} images but {len(runs)} runs "
                            f"of image tokens, so keep prompts cannot reuse its images; write `images:` as a folder "
                            f"of images instead.")
    return list(zip(entries, runs))


# --- building rows --------------------------------------------------------------------------------------


def prompt_tokens(prompt: str, images: int, processor: Any, render: Render) -> tuple[str, list[int]]:
    """The prompt under the chat template, tokenized with the template's single image token per image."""
    text = render(user_messages(prompt, images))
    return text, [int(t) for t in tokenizer_of(processor)(text)["input_ids"]]


def splice(text: str, ids: list[int], images: Sequence[tuple[dict[str, torch.Tensor], int]], image_id: int) -> KeepRow:
    """Each image token the template wrote becomes the run of tokens its (already processed) image has."""
    slots = [i for i, t in enumerate(ids) if t == image_id]
    if len(slots) != len(images):
        raise MMTuningError(f"mmtuning.keep: the chat template wrote {len(slots)} image tokens for {len(images)} "
                            f"image(s) in {text!r}; write `images:` as a folder of images so the processor expands them.")
    out: list[int] = []
    previous = 0
    for slot, (_, tokens) in zip(slots, images):
        out += ids[previous:slot] + [image_id] * tokens
        previous = slot + 1
    out += ids[previous:]
    return KeepRow(out, [entry for entry, _ in images], text)


def processed_row(messages: list[dict[str, Any]], pictures: Sequence[Any], processor: Any, render: Render) -> KeepRow:
    """A row whose images the processor encodes now (image files, keep data)."""
    text = render(messages)
    if pictures:
        batch = processor(text=[text], images=list(pictures), return_tensors="pt")
        ids = batch["input_ids"][0]
        if "attention_mask" in batch:
            ids = ids[batch["attention_mask"][0].bool()]
        return KeepRow(ids.tolist(), image_entries(batch), text)
    ids = tokenizer_of(processor)(text)["input_ids"]
    return KeepRow(list(ids), [], text)


def open_image(path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise MMTuningError(f"mmtuning.keep: cannot read image {path} ({error}); remove it or replace it.") from None


# --- batches --------------------------------------------------------------------------------------------


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` with every sequence right-aligned, so the last position of each row is
    where its answer starts (greedy generation, next-token logits)."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, length - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, length - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompt_batch(rows: Sequence[KeepRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts: the last position of every row is where its answer starts."""
    return {**left_padded([r.prompt_ids for r in rows], pad_id),
            **collate_images([e for r in rows for e in r.images])}


def answer_batch(rows: Sequence[KeepRow], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded prompt + base answer, and labels on the answer tokens only (as the task's training rows)."""
    length = max(len(r.prompt_ids) + len(r.answer_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        sequence = row.prompt_ids + row.answer_ids
        ids[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, : len(sequence)] = 1
        labels[i, len(row.prompt_ids): len(sequence)] = torch.tensor(row.answer_ids)
    return {"input_ids": ids, "attention_mask": mask, **collate_images([e for r in rows for e in r.images])}, labels
