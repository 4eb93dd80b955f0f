"""Keep's cost in the shapes single-GPU users train in: micro-batch 1-4, gradient accumulation, hundreds of image
tokens per row, answers of dozens of tokens. CPU time per optimizer step, as a ratio to no keep, side by side.

    PYTHONPATH=. python bench/keep_scale.py                         # the default grid, every variant
    PYTHONPATH=. python bench/keep_scale.py --micro 1 --accum 8 --image 576 --answer 48 --variants "no keep" defaults

Model: random-weight LLaVA, CLIP-style tower at 336 px / patch 14 (576 image tokens; `--image 256` and `1024` change
the image size), a Llama language model of hidden 384 x 4 layers (the regime of issue 26), float32, one thread.
Each row: the chat template, the image, a 20-token question, then an answer of `--answer` tokens (labels on the
answer only). Adapters on the language model's attention and the projector. Every variant is its own wrapped
model and Trainer from the same seed; optimizer steps are interleaved (`--block` steps of each variant in turn,
`--reps` times) so load on the machine hits all alike. Keep runs at full weight (past its ramp). Reported: mean
CPU time of this process per optimizer step (one thread: the work done) and its ratio to `no keep`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import torch

PROMPTS = ["what is the colour of the shape ?", "what shape is in the image ?"]
VARIANTS: dict[str, dict | None] = {  # the keep block besides `prompts` (None: no keep; `_packing`: the bench's switch)
    "no keep": None,
    "defaults": {},
    "defaults, refresh 2": {"refresh": 2},
    "defaults, rows joined (not packed)": {"_packing": False},
    "2 rows per step": {"batch_size": 2},
    "old defaults (4 rows per micro-batch, own forward)": {"batch_size": 4, "per": "micro-batch", "fuse": False,
                                                          "refresh": 1, "ramp": 0.5},
    "old recipe (8 rows per micro-batch, joined, refresh 2)": {"batch_size": 8, "per": "micro-batch", "refresh": 2,
                                                              "_packing": False},
}
WORDS = ("what", "is", "the", "shape", "colour", "of", "in", "image", "a", "left", "right", "top", "bottom", "red",
         "green", "blue", "circle", "square", "triangle", "star")


def text_of(count: int, offset: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(count))


def build_model(image: int, seed: int = 0):
    from transformers import AutoModelForImageTextToText

    from mmtuning_plugin.testing.tiny import tiny_config
    from mmtuning_plugin.testing.tiny_processing import tiny_processor

    side = int(round(image ** 0.5)) * 14
    config = tiny_config("llava", **{
        "text_config.hidden_size": 384, "text_config.intermediate_size": 1024, "text_config.num_hidden_layers": 4,
        "text_config.num_attention_heads": 6, "text_config.num_key_value_heads": 6, "text_config.head_dim": 64,
        "text_config.max_position_embeddings": 4096,
        "vision_config.hidden_size": 128, "vision_config.intermediate_size": 256, "vision_config.num_hidden_layers": 2,
        "vision_config.num_attention_heads": 4, "vision_config.head_dim": 32, "vision_config.image_size": side,
        "vision_config.patch_size": 14, "image_seq_length": (side // 14) ** 2})
    processor = tiny_processor(config)
    processor.tokenizer.padding_side = "right"
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32), processor


def rows_for(processor, count: int, answer: int, side: int):
    from PIL import Image

    tokenizer = processor.tokenizer
    rows = []
    for index in range(count):
        image = Image.new("RGB", (side, side), ((index * 37) % 256, (index * 91) % 256, 128))
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_of(20, index)}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        answer_ids = tokenizer(text_of(answer - 1, index + 3), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = inputs["input_ids"][0].tolist()
        rows.append({"input_ids": ids + answer_ids, "labels": [-100] * len(ids) + answer_ids,
                     "pixel_values": inputs["pixel_values"][0]})
    return rows


@functools.lru_cache(maxsize=None)
def example_module():
    """examples/train_with_trainer.py: the bench collates rows as the user's script does (one home for it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_with_trainer.py"
    spec = importlib.util.spec_from_file_location("train_with_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collate(rows, pad_id):
    return example_module().collate(rows, pad_id)


def build_variant(name, keep, args, rows):
    from transformers import TrainingArguments

    from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_keep
    from mmtuning_plugin.session import MMTuning

    model, processor = build_model(args.image)
    block = {"language": {"modules": "attention"}, "projector": {}}
    keep = dict(keep) if keep is not None else None
    packing = keep.pop("_packing", True) if keep is not None else True
    if keep is not None:
        block["keep"] = {"prompts": PROMPTS, **keep}
    session = MMTuning(block)
    model = session.wrap(model)
    training = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=10, per_device_train_batch_size=args.micro,
                                 gradient_accumulation_steps=args.accum, learning_rate=1e-4, report_to="none",
                                 use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    pad = processor.tokenizer.pad_token_id
    trainer = MMTuningTrainer(model=model, args=training, train_dataset=rows, mmtuning=session,
                              processing_class=processor, data_collator=lambda r: collate(r, pad))
    prepare_keep(trainer)
    if session.keep is not None:
        session.keep.total_steps, session.keep.accumulation = 1, args.accum  # past the ramp: full weight
        session.keep._packing = packing
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = args.accum
    return {"name": name, "trainer": trainer, "model": model, "keep": session.keep, "pad": pad, "times": [], "step": 1}


def optimizer_step(variant, micro_batches) -> float:
    trainer, model, keep = variant["trainer"], variant["model"], variant["keep"]
    if keep is not None:
        keep.step, keep.micro = variant["step"], 0
    variant["step"] += 1
    started = time.process_time()
    for batch in micro_batches:
        trainer.training_step(model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="+", default=[1])
    parser.add_argument("--accum", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--image", type=int, nargs="+", default=[576])
    parser.add_argument("--answer", type=int, nargs="+", default=[48])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--reps", type=int, default=4)  # even: at micro-batch 1 keep asks every 2nd step
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"keep_scale: CPU time per optimizer step, ratio to no keep; {args.reps} x {args.block} interleaved steps "
          f"per variant, {args.threads} thread(s)")
    for micro in args.micro:
        for accum in args.accum:
            for image in args.image:
                for answer in args.answer:
                    run_shape(argparse.Namespace(**{**vars(args), "micro": micro, "accum": accum, "image": image,
                                                    "answer": answer}))


def run_shape(args) -> None:
    variants_wanted = ["no keep"] + [v for v in args.variants if v != "no keep"]
    _, processor = build_model(args.image)
    side = int(round(args.image ** 0.5)) * 14
    per_step = args.micro * args.accum
    steps = args.reps * args.block + 1
    rows = rows_for(processor, per_step * steps, args.answer, side)
    variants = [build_variant(name, VARIANTS[name], args, rows) for name in variants_wanted]
    pad = variants[0]["pad"]
    steps_batches = [[collate(rows[(s * args.accum + m) * args.micro:(s * args.accum + m + 1) * args.micro], pad)
                      for m in range(args.accum)] for s in range(steps)]
    for variant in variants:  # warm-up
        optimizer_step(variant, steps_batches[0])
    index = 1
    for _ in range(args.reps):
        for variant in variants:
            for offset in range(args.block):
                variant["times"].append(optimizer_step(variant, steps_batches[index + offset]))
        index += args.block
    tokens = len(rows[0]["input_ids"])
    print(f"\nmicro-batch {args.micro}, accumulation {args.accum}, {args.image} image tokens, {args.answer}-token answers "
          f"({tokens} tokens per row)")
    base = statistics.mean(variants[0]["times"])
    for variant in variants:
        mean = statistics.mean(variant["times"])
        print(f"  {variant['name']:<56} {mean:7.3f} s/step  {mean / base:5.2f}x")


if __name__ == "__main__":
    main()
