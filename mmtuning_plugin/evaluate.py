"""E/F/O of an adapter on the user's own files: a target set (the new task) and a general set (what the
model knew), each a JSONL of `{"image": path, "question": ..., "answer": ..., "type": optional}`.

One model load: `before` is the base (adapters switched off by their flag), `after` the adapter. Answers are
greedy generations under the processor's chat template, scored by `scoring` (exact or normalised match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import MMTuningError
from .scoring import accuracy, accuracy_by_kind, efo

ITEM_EXAMPLE = '{"image": "pics/1.png", "question": "what shape is in the image?", "answer": "circle"}'


@dataclass
class EvalItem:
    image: Path
    question: str
    answer: str
    kind: str


def read_items(path: Path, name: str) -> list[EvalItem]:
    """Items of one JSONL set; any problem is an MMTuningError naming the file, line and the fix."""
    if not path.is_file():
        raise MMTuningError(f"--{name} {path}: no such file; write a JSONL file, one item per line, e.g. {ITEM_EXAMPLE}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--{name} {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MMTuningError(f"{where}: not JSON ({error.msg}); write one object per line, e.g. {ITEM_EXAMPLE}") from None
        if not isinstance(record, dict):
            raise MMTuningError(f"{where}: expected a JSON object like {ITEM_EXAMPLE}")
        missing = [k for k in ("image", "question", "answer") if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise MMTuningError(f"{where}: missing {', '.join(missing)} (each a non-empty string); write items like "
                                f"{ITEM_EXAMPLE}")
        image = Path(record["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise MMTuningError(f"{where}: image {image} does not exist (relative paths are read from the JSONL's "
                                f"folder); fix the path or remove the line.")
        items.append(EvalItem(image, record["question"], record["answer"], str(record.get("type", record["question"]))))
    if not items:
        raise MMTuningError(f"--{name} {path}: holds no items; write one JSON object per line, e.g. {ITEM_EXAMPLE}")
    return items


def item_batches(items: Sequence[EvalItem], processor, batch_size: int = 4):
    """Items as training batches (the probe's data): the question under the processor's chat template, the answer
    and end token after it, labels on the answer only, right padding. A generator: only batches read are built."""
    from .keep.rows import answer_batch, open_image, processed_row, template_renderer, user_messages

    render = template_renderer(processor)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(items), batch_size):
        rows = []
        for item in items[start: start + batch_size]:
            row = processed_row(user_messages(item.question, 1), [open_image(item.image)], processor, render)
            row.answer_ids = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(row)
        batch, labels = answer_batch(rows, pad)
        yield {**batch, "labels": labels}


@torch.no_grad()
def generate_answers(model, processor, items: Sequence[EvalItem], max_new_tokens: int = 16, batch_size: int = 16,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers under the processor's chat template (left padding), text up to the end-of-turn token."""
    from .base_view import cpu_4bit_repack_off
    from .keep import to_model
    from .keep.rows import open_image, user_messages

    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with cpu_4bit_repack_off(model):
            for start in range(0, len(items), batch_size):
                chunk = items[start: start + batch_size]
                texts = [processor.apply_chat_template(user_messages(item.question, 1), add_generation_prompt=True,
                                                       tokenize=False) for item in chunk]
                batch = processor(text=texts, images=[open_image(item.image) for item in chunk], return_tensors="pt",
                                  padding=True)
                batch = to_model(dict(batch), model)
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                if on_batch:
                    on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_sets(model, processor, sets: dict[str, list[EvalItem]], match: str, max_new_tokens: int = 16,
               batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Before (adapters off) and after (adapter on) accuracy per set and per question type, and E/F/O."""
    from .base_view import adapters_disabled

    report: dict[str, Any] = {"match": match, "sets": {}}
    measured: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for name, items in sets.items():
        row: dict[str, Any] = {"items": len(items)}
        for phase in ("before", "after"):
            if phase == "before":
                with adapters_disabled(model):
                    answers = generate_answers(model, processor, items, max_new_tokens, batch_size, on_batch)
            else:
                answers = generate_answers(model, processor, items, max_new_tokens, batch_size, on_batch)
            expected = [item.answer for item in items]
            row[phase] = accuracy(answers, expected, match)
            row[f"{phase}_by_type"] = accuracy_by_kind(answers, expected, [item.kind for item in items], match)
            row[f"{phase}_answers"] = answers
            measured[phase][name] = row[phase]
        report["sets"][name] = row
    report.update(efo(measured["before"], measured["after"]))
    return report


def load_model_and_processor(model_dir: str, what: str):
    """A local model directory's weights (float32) and its processor, which must have a chat template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(model_dir).is_dir():
        raise MMTuningError(f"{what} needs the model's weights, and '{model_dir}' is not a local model directory; "
                            f"pass the directory the model (config.json, weights, processor) was saved to.")
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MMTuningError(f"{what}: could not load the model and processor from {model_dir} ({first}); pass a "
                            f"directory with the weights and the processor saved in it.") from None
    if getattr(processor, "chat_template", None) is None:
        raise MMTuningError(f"{model_dir}: the processor has no chat template, so questions cannot be asked the way the "
                            f"model is trained; save one with the processor.")
    return model, processor


def load_adapter_model(adapter: Path, base: str | None, four_bit: bool):
    """The base model (from `--base` or the adapter's `base_model_name_or_path`) with the adapter loaded."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from .methods import register_peft_methods

    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise MMTuningError(f"{adapter}: no adapter_config.json; pass the directory a PEFT adapter was saved to.")
    if base is not None and not Path(base).is_dir():
        raise MMTuningError(f"--base {base}: not a model directory; pass the directory of the model the adapter was "
                            f"trained on (its config.json, weights and processor files).")
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    base = base or recorded
    if not base or not Path(base).is_dir():
        raise MMTuningError(f"{adapter}: its adapter_config.json names the base model '{recorded}', which is not a "
                            f"directory from here ({Path.cwd()}); pass --base MODEL_DIR.")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32,
                                                           llm_int8_skip_modules=["lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    processor = AutoProcessor.from_pretrained(base)
    if getattr(processor, "chat_template", None) is None:
        raise MMTuningError(f"{base}: the processor has no chat template, so questions cannot be asked the way the "
                            f"model was trained; save one with the processor.")
    register_peft_methods()  # an `adapter` or `moe-lora` adapter is a PEFT method PEFT learns from mmtuning
    return PeftModel.from_pretrained(model, str(adapter)), processor, base
