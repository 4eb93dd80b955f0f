"""Small helpers shared by several test files (pytest puts tests/ on sys.path)."""

import torch


def perturb_lora_b(model, std=0.05, seed=3):
    """Move the adapters away from their zero init, as a few task-loss steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
