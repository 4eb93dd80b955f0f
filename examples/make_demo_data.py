"""Writes the files the other examples read, from the demo's picture generator: PNG images plus

  train.jsonl    training rows    {"image": "images/train0.png", "question": "...", "answer": "..."}
  target.jsonl   eval, new task   {"image": ..., "question": ..., "answer": ..., "type": "position"}
  general.jsonl  eval, old skills {"image": ..., "question": ..., "answer": ..., "type": "colour"}
  keep.txt       keep prompts, one per line

Image paths are relative to the JSONL file. Run: python examples/make_demo_data.py data/
"""

import json
import sys
from pathlib import Path

from mmtuning_plugin.demo.data import TASKS, make_set


def write(out: Path, name: str, task: str, split: str, count: int, seed: int) -> None:
    kinds = {question: kind for question, kind in TASKS[task]}
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.jsonl", "w") as handle:
        for index, item in enumerate(make_set(task, split, count, seed=seed)):
            image = f"images/{name}{index}.png"
            item.image.save(out / image)
            row = {"image": image, "question": item.question, "answer": item.answer}
            if split == "eval":
                row["type"] = kinds[item.question]
            handle.write(json.dumps(row) + "\n")


def main(out: Path) -> None:
    write(out, "train", "target", "train", 2000, seed=0)
    write(out, "target", "target", "eval", 64, seed=0)
    write(out, "general", "general", "eval", 64, seed=0)
    (out / "keep.txt").write_text("".join(f"{question}\n" for question, _ in TASKS["general"]))
    print(f"wrote {out}/train.jsonl, target.jsonl, general.jsonl, keep.txt and {out}/images/")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
