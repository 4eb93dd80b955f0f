"""Writes a tiny LLaVA checkpoint and a 4-row image dataset for LLaMA-Factory runs (run with its Python).

    python tests/hosts/lf_fixture.py OUT_DIR   ->  OUT_DIR/model, OUT_DIR/data/{dataset_info.json,tiny.json,keep.jsonl,images}

Built in the LLaMA-Factory venv itself, so the checkpoint is saved by the transformers that loads it.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mmtuning_plugin.testing.tiny_processing import save_tiny_checkpoint

ROWS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
DATASET_INFO = {"tiny": {
    "file_name": "tiny.json", "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}, "keep_questions": {  # unlabelled keep data: sharegpt defaults (from/value, human), images relative to dataset_dir
    "file_name": "keep.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images"},
}}
KEEP_QUESTIONS = ["<image> what colour is the image ?", "<image> how many shapes are there ?"]  # tiny vocabulary words


def write(root: Path) -> None:
    save_tiny_checkpoint("llava", root / "model")
    images = root / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (colour, shape) in enumerate(ROWS):
        pixels = (np.random.default_rng(index).random((32, 32, 3)) * 255).astype("uint8")
        path = images / f"{index}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"messages": [{"role": "user", "content": "<image> what shape is in the image ?"},
                                  {"role": "assistant", "content": f"a {colour} {shape} ."}],
                     "images": [str(path)]})
    (root / "data" / "tiny.json").write_text(json.dumps(rows))
    keep = []
    for index, question in enumerate(KEEP_QUESTIONS):
        Image.fromarray(np.full((32, 32, 3), 60 + 120 * index, dtype="uint8")).save(images / f"keep{index}.png")
        keep.append({"conversations": [{"from": "human", "value": question}], "images": [f"images/keep{index}.png"]})
    (root / "data" / "keep.jsonl").write_text("".join(json.dumps(row) + "\n" for row in keep))
    (root / "data" / "dataset_info.json").write_text(json.dumps(DATASET_INFO))


if __name__ == "__main__":
    write(Path(sys.argv[1]))
