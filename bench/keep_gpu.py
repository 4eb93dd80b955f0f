"""Step time and peak memory of a 7B-class LLaVA (random weights) with and without `keep:`, on a GPU, in the shape a
single-GPU user trains in: micro-batch 1, gradient accumulation 8, 576 image tokens per row.

    PYTHONPATH=. python bench/keep_gpu.py --device cuda                 # 7B-class, bf16 (needs ~40 GB)
    PYTHONPATH=. python bench/keep_gpu.py --size tiny --device cpu      # the same path on a tiny model (smoke)

The model is LLaVA-1.5-7B-shaped (Llama-2-7B language model, CLIP ViT-L/14-336 vision tower) built from
its config with random weights: no download. Adapters on the language model's attention (r 16) and the
projector. Modes: no keep; keep's defaults (only `prompts:` written: half as many keep rows as training rows per
optimizer step, packed behind the rows whose images they ask about); and the defaults before 2026-12 (4 rows in
every micro-batch, a forward of their own). One model: the modes take turns in interleaved blocks of optimizer
steps, so all see the same device state. Reports median optimizer-step time, the ratio, and the peak memory
allocated in each mode (`torch.cuda.max_memory_allocated`: the fused forward keeps logits for the keep positions).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

SIZES = {  # dotted config overrides on top of tiny_config("llava")
    "7b": {"text_config.hidden_size": 4096, "text_config.intermediate_size": 11008,
           "text_config.num_hidden_layers": 32, "text_config.num_attention_heads": 32,
           "text_config.num_key_value_heads": 32, "text_config.head_dim": 128, "text_config.vocab_size": 32064,
           "text_config.max_position_embeddings": 4096,
           "vision_config.hidden_size": 1024, "vision_config.intermediate_size": 4096,
           "vision_config.num_hidden_layers": 24, "vision_config.num_attention_heads": 16, "vision_config.head_dim": 64,
           "vision_config.image_size": 336, "vision_config.patch_size": 14, "image_seq_length": 576},
    "tiny": {},
}
PROMPTS = ["what is the colour of the shape ?", "what shape is in the image ?"]
KEEP = {"prompts": PROMPTS}
MODES = {"without keep": None, "keep (defaults)": {},  # keep block changes per mode
         "keep, old defaults (4 rows per micro-batch, own forward)": {"batch_size": 4, "per": "micro-batch",
                                                                      "fuse": False, "refresh": 1, "ramp": 0.5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForImageTextToText, TrainingArguments

    from mmtuning_plugin.demo.data import make_set
    from mmtuning_plugin.config import KeepSpec
    from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_keep
    from mmtuning_plugin.keep import Keep
    from mmtuning_plugin.session import MMTuning
    from mmtuning_plugin.testing.tiny import tiny_config
    from mmtuning_plugin.testing.tiny_processing import tiny_processor

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = tiny_config("llava", **SIZES[args.size])
    processor = tiny_processor(config)
    processor.tokenizer.padding_side = "right"
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    session = MMTuning({"language": {"modules": "attention"}, "projector": {}, "keep": KEEP})
    model = session.wrap(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    items = make_set("general", "train", args.batch * args.accum * (args.reps * args.block + 1) * len(MODES))
    rows = []
    for item in items:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}],
            add_generation_prompt=True, tokenize=False) + item.answer + processor.tokenizer.eos_token
        rows.append((text, item.image))

    def collate(chunk):
        batch = processor(text=[t for t, _ in chunk], images=[i for _, i in chunk], return_tensors="pt", padding=True)
        batch = dict(batch)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    trainer = MMTuningTrainer(model=model, args=TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=10, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, report_to="none",
        use_cpu=not cuda, bf16=cuda, save_strategy="no", remove_unused_columns=False, disable_tqdm=True),
        train_dataset=rows, mmtuning=session, processing_class=processor, data_collator=collate)
    keeps = {}
    for name, changes in MODES.items():
        if changes is not None:
            session.keep = Keep(KeepSpec(**KEEP, **changes))
            prepare_keep(trainer)
            keeps[name], session.keep.total_steps, session.keep.accumulation = session.keep, 1, args.accum
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = args.accum
    micro = [collate(rows[i * args.batch:(i + 1) * args.batch]) for i in range(len(rows) // args.batch)]
    batches = [micro[i * args.accum:(i + 1) * args.accum] for i in range(len(micro) // args.accum)]
    times: dict[str, list[float]] = {name: [] for name in MODES}
    peaks: dict[str, int] = {name: 0 for name in times}

    def step(index: int, name: str) -> float:
        session.keep = keeps.get(name)
        if session.keep is not None:
            session.keep.step, session.keep.micro = index + 1, 0
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for batch in batches[index]:
                trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    index = 0
    for name in times:  # warm-up, not timed
        step(index, name)
        index += 1
    for _ in range(args.reps):
        for name in times:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.block):
                times[name].append(step(index, name))
                index += 1
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    base = statistics.median(times["without keep"])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.size} LLaVA (random weights), {device}, micro-batch {args.batch}, accumulation {args.accum}, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    for name, values in times.items():
        median = statistics.median(values)
        peak = f"{peaks[name] / 2**30:.1f} GiB" if cuda else "n/a"
        print(f"{name:<58} median step {median:.3f} s  ratio {median / base:.2f}x  peak memory {peak}")


if __name__ == "__main__":
    main()
