"""Tiny checkpoints load like real ones: AutoProcessor + AutoModel, chat template, image tokens."""

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmtuning_plugin.testing.tiny_processing import VOCAB_SIZE, save_tiny_checkpoint, tiny_tokenizer


def test_tokenizer_has_fixed_special_ids_and_full_vocab():
    tokenizer = tiny_tokenizer({"<image>": 300})
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids("<image>") == 300
    assert tokenizer.decode(tokenizer("a red circle .")["input_ids"]) == "a red circle ."


def test_llava_checkpoint_roundtrip_with_processor_and_chat_template(tmp_path):
    save_tiny_checkpoint("llava", tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape ?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    assert int((batch["input_ids"] == 300).sum()) == model.config.image_seq_length
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], VOCAB_SIZE)
