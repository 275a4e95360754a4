"""Several models of one architecture trained at once, as one stacked model (torch.func).

The K models' parameters are stacked along a new leading dimension and one vmapped
`functional_call` computes all their logits in a single forward pass. Nothing else is
shared: each model draws its own minibatch sequence (`batch_order` with its own data seed,
and its own CPU RNG stream for augmentation), computes its own objective on its slice of
the logits, and the K losses are summed, so each model's gradient is exactly the gradient
of its own loss. The optimizers are elementwise, so one over the stacked parameters
updates each model as its own optimizer would.

Valid only for models whose forward pass does not couple examples or draw random numbers
in training mode: no batch norm, no active dropout (`unstackable` says why not). The
executors train such models one at a time.

Numerics (CPU, measured in tests/test_stacked.py): the forward pass is bitwise that of the
model alone; weight gradients come from batched matmuls that sum in another order, so a
stacked model drifts from its solo twin by rounding (1e-7 after a few steps, growing over a
long training as with any change of summation order). A model's result is bitwise
independent of the stack's size, of its position and of the other models (see PAD).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdaudit.accel import accel_for, compiled
from kdaudit.conditions import Batch, Objective
from kdaudit.config import TrainConfig
from kdaudit.train import (
    CHECK_EVERY,
    NonFiniteLoss,
    StepHook,
    TrainResult,
    batch_order,
    make_optimizer,
    make_schedule,
    total_steps,
)


@dataclass
class Member:
    """One model of a stack: trained in place, as `train(model, data, objective, cfg,
    data_seed)` would train it alone."""

    model: nn.Module
    objective: Objective
    data_seed: int


def unstackable(model: nn.Module) -> str | None:
    """Why `model` cannot train in a stack (None: it can)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return f"{name or 'model'} is a batch norm (statistics couple the batch)"
        if _dropout_rate(module) > 0:
            return f"{name or 'model'} has dropout {_dropout_rate(module)} (random masks)"
    if any(True for _ in model.buffers()):
        return "the model has buffers (state outside its parameters)"
    return None


def _dropout_rate(module: nn.Module) -> float:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    rate = getattr(module, "dropout", 0.0)  # a float in MultiheadAttention and GPT attention
    return rate if isinstance(rate, float) else 0.0


def train_stacked(
    members: list[Member], data, cfg: TrainConfig, on_step: StepHook | None = None
) -> list[TrainResult | NonFiniteLoss]:
    """Train every member's model in place; per member its result, or the NonFiniteLoss it
    would have raised alone (the other members train on, unaffected)."""
    start = time.perf_counter()
    # channels_last does not apply: vmap turns the K models' convolutions into one grouped one
    accel = replace(accel_for(members[0].model, cfg, data.device), channels_last=False)
    params = StackedParameters([m.model for m in members])
    forward = _stacked_forward(members[0].model, accel.compile)
    optimizer = make_optimizer(params.leaves, cfg)
    schedule = make_schedule(optimizer, cfg, total_steps(data.n_train, cfg))
    nonfinite = torch.zeros(len(members), dtype=torch.bool, device=data.device)  # (K,)
    failures: dict[int, NonFiniteLoss] = {}
    step = -1
    for step, batches in enumerate(_Streams(members, cfg).batches(data)):
        x = torch.stack([b.x for b in batches])  # (K, B, ...)
        with accel.autocast():
            logits = forward(params.views(), params.buffers, x)  # (K, B, C) or (K, B, T, V)
        losses = _losses(members, logits.float(), batches)  # (K,)
        # d(sum)/d(loss_k) = 1: each model gets exactly the gradient of its own loss
        _update(optimizer, schedule, losses.sum())
        nonfinite |= ~torch.isfinite(losses.detach())  # no host sync here
        if on_step is not None:
            on_step(step, batches[0].idx, losses.detach().mean())
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            _check(nonfinite, step, failures)
    _check(nonfinite, step, failures)
    params.unstack([m.model for m in members])
    seconds = (time.perf_counter() - start) / len(members)  # each member's share
    engine = accel.describe()
    return [
        failures.get(k) or TrainResult(step + 1, seconds, {**engine, "stack": _where(k, members)})
        for k in range(len(members))
    ]


def _update(optimizer, schedule, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()


class _Streams:
    """Each member's minibatches: its own `batch_order`, and its own CPU RNG stream for the
    augmentation draws (the stream `train` seeds with the member's data seed)."""

    def __init__(self, members: list[Member], cfg: TrainConfig):
        self.cfg = cfg
        self.seeds = [m.data_seed for m in members]
        self.rng = [torch.Generator().manual_seed(s).get_state() for s in self.seeds]

    def batches(self, data) -> Iterator[list[Batch]]:
        orders = [batch_order(data.n_train, self.cfg, s) for s in self.seeds]
        for indices in zip(*orders, strict=True):
            yield [self._batch(data, k, idx) for k, idx in enumerate(indices)]

    def _batch(self, data, k: int, idx: torch.Tensor) -> Batch:
        idx = idx.to(data.device, non_blocking=True)
        if self.cfg.augment == "none":  # no draws: no RNG to swap
            x, y = data.train_batch(idx, self.cfg.augment)
            return Batch(idx, x, y.reshape(-1))
        outside = torch.get_rng_state()
        torch.set_rng_state(self.rng[k])
        try:
            x, y = data.train_batch(idx, self.cfg.augment)
            self.rng[k] = torch.get_rng_state()
        finally:
            torch.set_rng_state(outside)
        return Batch(idx, x, y.reshape(-1))


def _stacked_forward(model: nn.Module, compile: bool):
    """(params, buffers, x) -> logits, vmapped over the leading (model) dimension of all
    three. The skeleton holds the architecture only (on the meta device)."""
    if compile:
        return compiled(model, stacked=True)
    skeleton = copy.deepcopy(model).to("meta")

    def one(params, buffers, x):
        return functional_call(skeleton, (params, buffers), (x,))

    return vmap(one, in_dims=(0, 0, 0))


# Fused optimizers run a tensor's last (numel mod vector width) elements through scalar code
# that rounds differently from the vector code (FMA). Padding every stacked parameter to a
# multiple of PAD elements leaves no such tail: each model's update is then independent of
# its position in the stack and of the stack's size. The padding's gradient is zero and
# stays so (Adam, SGD and weight decay keep a zero element at zero).
PAD = 64


class StackedParameters:
    """The K models' parameters, each stacked (K, ...) inside a flat zero-padded leaf
    (ceil(K * numel / PAD) * PAD,) that the optimizer updates."""

    def __init__(self, models: list[nn.Module]):
        stacked, self.buffers = stack_module_state(models)  # name -> (K, ...)
        self.shapes = {name: t.shape for name, t in stacked.items()}
        self._leaves = {name: _padded(t) for name, t in stacked.items()}
        self.names = _parameter_names(models[0])

    @property
    def leaves(self) -> list[torch.Tensor]:
        return list(self._leaves.values())

    def views(self) -> dict[str, torch.Tensor]:
        """Every parameter name -> its (K, ...) view of a leaf; tied names share one view."""
        views = {
            name: leaf[: self.shapes[name].numel()].view(self.shapes[name])
            for name, leaf in self._leaves.items()
        }
        return {name: views[canonical] for name, canonical in self.names.items()}

    @torch.no_grad()
    def unstack(self, models: list[nn.Module]) -> None:
        """Copy model k's trained parameters back into models[k]."""
        views = self.views()
        for k, model in enumerate(models):
            for name, p in model.named_parameters(remove_duplicate=False):
                p.copy_(views[name][k])


def _padded(stacked: torch.Tensor) -> torch.Tensor:
    n = stacked.numel()
    leaf = torch.zeros(-(-n // PAD) * PAD, dtype=stacked.dtype, device=stacked.device)
    leaf[:n] = stacked.detach().flatten()
    return leaf.requires_grad_()


def _parameter_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name -> the name `named_parameters` keeps for it. Tied weights (GPT's
    embedding and head) have two names; the skeleton on the meta device is no longer tied,
    so both names must be given the one stacked tensor."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def _losses(members: list[Member], logits: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
    # Each objective sees its model's logits flattened as alone: (B, C) or (B * T, V).
    return torch.stack(
        [m.objective(z.flatten(0, -2), b) for m, z, b in zip(members, logits, batches, strict=True)]
    )


def _check(nonfinite: torch.Tensor, step: int, failures: dict[int, NonFiniteLoss]) -> None:
    """Record, for members whose loss went non-finite since the last check, the error the
    solo loop raises at this check (same step window)."""
    for k in torch.nonzero(nonfinite).flatten().tolist():
        failures.setdefault(k, NonFiniteLoss(max(0, step - CHECK_EVERY + 1), step))


def _where(k: int, members: list[Member]) -> dict:
    return {"size": len(members), "index": k, "data_seeds": [m.data_seed for m in members]}
