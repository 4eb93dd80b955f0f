"""The transformers Trainer integration on a tiny real model: groups per modality, loss goes down."""

import torch
from transformers import TrainingArguments

from mmtuning_plugin.integrations.hf import MMTuningTrainer, prepare_model
from mmtuning_plugin.testing.tiny import RepeatedBatch, stack_rows, tiny_batch, tiny_model


def test_trainer_trains_only_adapters_with_one_group_per_modality(tmp_path):
    model = tiny_model("llava")
    batch = tiny_batch(model, batch=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, session = prepare_model(model, {"vision": {"layers": {"top": 2}}, "projector": {"r": 8}})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=12,
                             learning_rate=5e-3, logging_steps=4, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = MMTuningTrainer(model=model, args=args, train_dataset=RepeatedBatch(batch.inputs, 8), data_collator=stack_rows,
                              mmtuning=session)
    trainer.train()

    names = sorted(group["name"] for group in trainer.optimizer.param_groups)
    assert names == ["language", "projector", "vision"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    for name, param in model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if plain in base:
            assert torch.equal(param.detach(), base[plain]), name
