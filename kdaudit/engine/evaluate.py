"""A trained model's outputs on a split: fp32 logits, or accuracy and loss streamed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def predict(model: nn.Module, data, split: str, batch_size: int) -> torch.Tensor:
    """fp32 logits (N, K) on the CPU, in eval mode: one row per example (per scored
    position, for sequences) of the split, in the order of `data.labels(split)`."""
    model.eval()
    return torch.cat(
        [_rows(model(x), keep).float().cpu() for x, keep in data.eval_batches(split, batch_size)]
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module, data, split: str, batch_size: int, limit: int | None = None
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over a split (its first `limit` examples), streamed."""
    model.eval()
    labels = data.labels(split)
    correct = nll = 0.0
    start = 0
    for x, keep in data.eval_batches(split, batch_size):
        if limit is not None and start >= limit:
            break
        z = _rows(model(x), keep).double()
        y = labels[start : start + len(z)]
        correct += (z.argmax(dim=1) == y).sum().item()
        nll += F.cross_entropy(z, y, reduction="sum").item()
        start += len(z)
    return correct / start, nll / start


def _rows(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, K) as is; (B, T, V) -> the kept positions (n, V)."""
    return logits if keep is None else logits[keep]
