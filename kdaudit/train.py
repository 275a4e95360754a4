"""The one training loop. Conditions differ only by the objective passed in."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdaudit.accel import accel_for, prepare
from kdaudit.conditions import Batch, Objective, objective_parameters
from kdaudit.config import TrainConfig

# (step, batch indices (B,), loss as a 0-d tensor: calling .item() on it is the caller's choice)
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]
CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check syncs the device)


class NonFiniteLoss(RuntimeError):
    def __init__(self, first_step: int, last_step: int):
        self.step = last_step
        super().__init__(
            f"the training loss became NaN or inf between steps {first_step} and {last_step}; "
            "lower train.lr or check the inputs"
        )


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    engine: dict = field(default_factory=dict)  # how it was trained, for the run's record


def batch_order(n: int, cfg: TrainConfig, seed: int) -> Iterator[torch.Tensor]:
    """Minibatch indices (B,): a fresh permutation per epoch from a generator seeded by `seed`.
    A pure function of (n, batch size, epochs, max steps, seed): the pairing of conditions."""
    gen = torch.Generator().manual_seed(seed)
    steps = total_steps(n, cfg)
    step = 0
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            if step == steps:
                return
            yield perm[start : start + cfg.batch_size]
            step += 1


def total_steps(n: int, cfg: TrainConfig) -> int:
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def train(
    model: nn.Module,
    data,  # TensorData or TokenData: n_train, device, train_batch
    objective: Objective,
    cfg: TrainConfig,
    data_seed: int,
    on_step: StepHook | None = None,
) -> TrainResult:
    start = time.perf_counter()
    device = data.device
    torch.manual_seed(data_seed)  # global RNG (dropout masks): same draws for every condition
    accel = accel_for(model, cfg, device)
    forward = prepare(model, accel)
    # an objective's own parameters (feature-map projections) train with the model's
    optimizer = make_optimizer([*model.parameters(), *objective_parameters(objective)], cfg)
    schedule = make_schedule(optimizer, cfg, total_steps(data.n_train, cfg))
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    model.train()
    step = -1
    for step, idx in enumerate(batch_order(data.n_train, cfg, data_seed)):
        idx = idx.to(device, non_blocking=True)
        x, y = data.train_batch(idx, cfg.augment)
        batch = Batch(idx, x, y.reshape(-1))  # (B,) or, for sequences, (B * T,)
        with accel.autocast():
            logits = forward(accel.inputs(x)).flatten(0, -2)  # (B, K) or (B * T, V)
        loss = objective(logits.float(), batch)  # fp32 logits: a no-op without autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        nonfinite |= ~torch.isfinite(loss.detach())  # no host sync here
        if on_step is not None:
            on_step(step, idx, loss.detach())
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            _check(nonfinite, step)
    _check(nonfinite, step)
    engine = {"stack": None, **accel.describe()}
    return TrainResult(step + 1, time.perf_counter() - start, engine)


def _check(nonfinite: torch.Tensor, step: int) -> None:
    if bool(nonfinite):
        raise NonFiniteLoss(max(0, step - CHECK_EVERY + 1), step)


def make_optimizer(params: Iterable[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    # Every optimizer here updates each element from that element alone, so one optimizer
    # over stacked parameters (kdaudit.stacked) is the same as one per model.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel is deterministic on CPU and CUDA, and ~15% faster per step on CPU here.
    return cls(params, cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """The learning-rate schedule, or None for a constant rate (no per-step call)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    return None


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
