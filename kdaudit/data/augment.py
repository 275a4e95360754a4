"""Batch augmentations on the device. Random draws come from torch's global RNG, which the
training loop seeds with the run's data-order seed: every condition of one student seed
sees the same augmented batches (PROTOCOL section 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Augment = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) -> (B, C, H, W), same dtype


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by `pad`, and a random horizontal flip, per image."""
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2)).to(x.device)  # drawn on the CPU RNG
    flips = (torch.rand(b) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def randaugment(x: torch.Tensor) -> torch.Tensor:
    """torchvision's RandAugment (default settings), drawn independently per image."""
    from torchvision.transforms import v2

    if x.dtype != torch.uint8:
        raise ValueError("randaugment needs uint8 images; this dataset's inputs are not images")
    op = v2.RandAugment()
    return torch.stack([op(image) for image in x])


AUGMENTATIONS: dict[str, Augment | None] = {
    "none": None,
    "crop_flip": crop_flip,
    "randaugment": randaugment,
}
