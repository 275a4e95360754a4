"""The baseline for the speed benchmarks: the training loop a user would write by hand.

A DataLoader over a TensorDataset (per-example indexing and collation; its batches are the
run's `batch_order`, so both sides train on the same minibatches), the loss read with .item() at
every step for logging, torch.optim.Adam with its default (non-fused) implementation, the
teacher's forward pass on every KD batch (no cached teacher outputs), and evaluation
through a DataLoader. Seeds, data and hyperparameters are the run's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdaudit.engine.loop import batch_order
from kdaudit.models import build_model
from kdaudit.protocol import RunSpec


def plain_loss(spec: RunSpec, logits, y, x, teacher: nn.Module | None) -> torch.Tensor:
    """The condition's loss written out: CE, or (1 - a) CE + a T^2 KL(target || student)."""
    ce = F.cross_entropy(logits, y)
    if spec.condition in ("teacher", "siddo"):
        return ce
    t = spec.temperature
    if spec.condition == "kd":
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / t, dim=-1)
    else:  # rcd: the class-uniform target
        k = logits.shape[-1]
        target = torch.full_like(logits, -math.log(k))
    kl = F.kl_div(F.log_softmax(logits / t, dim=-1), target, reduction="batchmean", log_target=True)
    return (1 - spec.alpha) * ce + spec.alpha * t**2 * kl


def train_plain(
    spec: RunSpec, data, teacher: nn.Module | None = None, device: str = "cpu"
) -> tuple[nn.Module, list]:
    """Train one run of the grid by hand; the model and its per-step losses. On a GPU the
    batches are copied to it per step, as a DataLoader user does."""
    cfg = spec.train
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed)
    model = model.to(device)
    torch.manual_seed(spec.data_seed)
    dataset = TensorDataset(data.train_x, data.train_y)
    # Not `shuffle=True`: RandomSampler draws one extra permutation per epoch, so even with a
    # seeded generator its order differs from `batch_order` after the first epoch.
    order = [b.tolist() for b in batch_order(len(dataset), cfg, spec.data_seed)]
    loader = DataLoader(dataset, batch_sampler=order)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for x, y in loader:  # every epoch's batches
        x, y = x.to(device), y.to(device)
        loss = plain_loss(spec, model(x), y, x, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


@torch.no_grad()
def plain_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Test logits (N, K) on the CPU through a DataLoader, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(TensorDataset(x), batch_size)
    return torch.cat([model(xb.to(device)).cpu() for (xb,) in loader])
