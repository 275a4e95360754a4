"""Model registry. Every model maps inputs (B, ...) to logits (B, K)."""

from __future__ import annotations

import torch
from torch import nn

from kdaudit.registry import Registry

# info: width = the config field that sets the model's width (capacity scaling scales it),
# width_multiple_of = the field its width must be a multiple of (e.g. attention heads).
MODELS: Registry[nn.Module] = Registry("model")


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int, init_seed: int) -> nn.Module:
    """Build on the CPU from `init_seed` alone, so the initial weights are a pure function of
    the seed (identical whatever the device or the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return MODELS.build(cfg, input_shape, num_classes)


from kdaudit.models import audio, cnn1d, factory, gpt, mlp, vision  # noqa: E402,F401  (registers)
