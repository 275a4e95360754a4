"""Model registry. Every model maps inputs (B, ...) to logits (B, K).

Importing it loads no torch: the built-in models are declared (settings, builder by name) in
kdaudit.models.configs, and a model's module is imported when one is first built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdaudit.registry import Registry

if TYPE_CHECKING:
    from torch import nn

# info: width = the config field that sets the model's width (capacity scaling scales it),
# width_multiple_of = the field its width must be a multiple of (e.g. attention heads).
MODELS: Registry[nn.Module] = Registry("model")


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int, init_seed: int) -> nn.Module:
    """Build on the CPU from `init_seed` alone, so the initial weights are a pure function of
    the seed (identical whatever the device or the global RNG state)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return MODELS.build(cfg, input_shape, num_classes)


from kdaudit.models import configs  # noqa: E402,F401  (declares the built-in models)
