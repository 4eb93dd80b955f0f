"""Fine-tune a vision-language model with mmtuning through the plain transformers Trainer: the whole script a
user writes, on the tiny LLaVA that ships with mmtuning (CPU, about a minute), with `keep:` on (about 35 s of training for 500 steps on 2 cores).

  python examples/make_demo_data.py data/
  python examples/train_with_trainer.py --data data/ --out run/
  mmtune eval run/adapter --target data/target.jsonl --general data/general.jsonl

Swap MODEL for your own model directory and the data for yours; docs/data.md explains each part.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, TrainingArguments

from mmtuning_plugin.demo.model import MODEL_DIR
from mmtuning_plugin.integrations.hf import MMTuningTrainer, from_pretrained

BLOCK = {
    "vision": {"modules": "attention", "layers": {"top": 2}, "r": 4},
    "language": {"modules": "attention"},
    # keep: the old skills' questions (keep.txt) asked about the training rows' own pictures, answered the way
    # the adapter-off base answers them; the settings are the demo recipe's (docs/keep.md)
    "keep": {"weight": 0.2, "ramp": 1.0, "batch_size": 8, "fuse": True, "refresh": 2},
}


def read_rows(path: Path) -> list[dict]:
    """Training rows: one JSON object per line, image paths relative to the file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**row, "image": path.parent / row["image"]} for row in rows]


def encode(processor, row: dict) -> dict:
    """One row as the model trains on it: the chat-templated prompt with the image tokens expanded by the
    processor, then the answer and the end-of-turn token; labels only on the answer (-100 elsewhere)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with Image.open(row["image"]) as image:
        inputs = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    tokenizer = processor.tokenizer
    answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = inputs["input_ids"][0].tolist()
    return {"input_ids": prompt_ids + answer, "labels": [-100] * len(prompt_ids) + answer,
            "pixel_values": inputs["pixel_values"][0]}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right padding; the attention mask marks real tokens; pixel values stacked."""
    length = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), length), pad_id), "labels": torch.full((len(rows), length), -100),
             "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        batch["labels"][i, :n] = torch.tensor(r["labels"])
        batch["attention_mask"][i, :n] = 1
    batch["pixel_values"] = torch.stack([r["pixel_values"] for r in rows])
    return batch


def train(data: Path, out: Path, steps: int = 500, model_dir: str = str(MODEL_DIR), block: dict | None = None,
          seed: int = 42) -> Path:
    """Train on data/train.jsonl with `block` (default BLOCK, keep prompts from data/keep.txt); returns the adapter."""
    torch.set_num_threads(1)  # on a small CPU one thread per process is often several times faster
    if block is None:
        block = {**BLOCK, "keep": {**BLOCK["keep"], "prompts": (data / "keep.txt").read_text().splitlines()}}
    model, session = from_pretrained(model_dir, block, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = [encode(processor, row) for row in read_rows(data / "train.jsonl")]
    training = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=2e-3,
        logging_steps=10, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
        remove_unused_columns=False,  # the Trainer would drop pixel_values otherwise
    )
    trainer = MMTuningTrainer(model=model, args=training, train_dataset=rows, mmtuning=session,
                              processing_class=processor,  # keep builds its rows with the run's processor
                              data_collator=lambda batch: collate(batch, processor.tokenizer.pad_token_id))
    trainer.train()
    model.save_pretrained(str(out / "adapter"))
    return out / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--model", default=str(MODEL_DIR))
    args = parser.parse_args()
    adapter = train(args.data, args.out, args.steps, args.model)
    print(f"adapter: {adapter}\nscore it: mmtune eval {adapter} "
          f"--target {args.data / 'target.jsonl'} --general {args.data / 'general.jsonl'}")


if __name__ == "__main__":
    main()
