"""The one training loop. Conditions differ only by the objective passed in.

`run_steps` is the step skeleton every run goes through, one model alone (`train`) or a
stack of models trained at once (kdaudit.engine.stacking.train_stacked): the update, the
non-finite check without a host sync per step, the periodic check and the progress hook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdaudit.conditions.objectives import Batch, Objective, objective_parameters
from kdaudit.config import TrainConfig
from kdaudit.engine.accel import accel_for, prepare

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


def make_optimizer(params: Iterable[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    # Every optimizer here updates each element from that element alone, so one optimizer
    # over stacked parameters (kdaudit.engine.stacking) is the same as one per model.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel is deterministic on CPU and CUDA, and ~15% faster per step on CPU here.
    return cls(params, cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class Update:
    """Each step's `zero_grad(set_to_none=True)` and `step()` of an optimizer. A fused Adam
    or AdamW (make_optimizer's) is stepped by calling its kernel directly once its state
    exists: the call torch.optim makes, on the same tensors with the same arguments, so
    bitwise the same update (tests/test_parallel.py), without the per-call bookkeeping around
    it (hooks, profiler scopes, grouping tensors by device and dtype), which on the CPU costs
    about a tenth of a small MLP's step. Its parameters then share one step count, advanced
    by one add a step instead of one per parameter: they all step together, so every count
    is the same number. Anything else goes through `optimizer.step()`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.group = optimizer.param_groups[0]
        self.kernel = _fused_kernel(optimizer)
        self.state: tuple[list, list, list] | None = None  # exp_avgs, exp_avg_sqs, steps

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.kernel is None or self.state is None or any(g is None for g in grads):
            self._own_counts()
            self.optimizer.step()  # the first step makes the state; a param without a grad
            self.state = self._state() if self.kernel is not None else None
            return
        with torch.no_grad():  # as torch.optim steps
            self._kernel(grads)

    def _kernel(self, grads: list[torch.Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = self.state
        g = self.group
        steps[0].add_(1)  # the one count every parameter's entry is
        self.kernel(self.params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                    lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                    weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                    grad_scale=None, found_inf=None)  # fmt: skip

    def _state(self) -> tuple[list, list, list] | None:
        """The kernel's state lists, with one step count shared by all parameters; None
        (torch.optim steps) before the state exists or when the counts differ."""
        states = [self.optimizer.state.get(p, {}) for p in self.params]
        if not all("exp_avg" in s for s in states):
            return None
        count = states[0]["step"]
        if not all(torch.equal(s["step"], count) for s in states):
            return None
        for s in states:
            s["step"] = count
        return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [count] * len(states))  # fmt: skip

    def _own_counts(self) -> None:
        """Before torch.optim steps again: a count of its own per parameter, as it keeps
        them (it adds one to every entry of its list, which a shared one would take n times)."""
        if self.state is None:
            return
        for p in self.params:
            state = self.optimizer.state[p]
            state["step"] = state["step"].clone()
        self.state = None


def _fused_kernel(optimizer: torch.optim.Optimizer):
    """torch's fused Adam (or AdamW) kernel when `optimizer` is stepped by it alone, else None."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    if len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    plain = not (g["amsgrad"] or g["maximize"] or g["differentiable"] or g["capturable"])
    if not (g["fused"] and plain and isinstance(g["lr"], float)):
        return None
    decoupled = g.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
    return torch._fused_adamw_ if decoupled else torch._fused_adam_


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """The learning-rate schedule, or None for a constant rate (no per-step call)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    return None


def run_steps(
    batches: Iterable[tuple[torch.Tensor, Any]],  # (batch indices (B,), what `loss` takes)
    loss: Callable[[Any], torch.Tensor],  # -> one model's 0-d loss, or a stack's (K,) losses
    optimizer: torch.optim.Optimizer,
    schedule,
    members: int,  # models trained (1 alone, K in a stack)
    device: torch.device,
    on_step: StepHook | None = None,
) -> tuple[int, dict[int, NonFiniteLoss]]:
    """The step skeleton: steps taken, and per model whose loss went non-finite the error it
    raises (found at the periodic check; the others train on). Stops when every model failed."""
    # (K,) sum of every loss so far, in float64 (MPS has none: fp32): NaN or inf once any
    # loss was, and no sum of finite fp32 losses overflows it. One op a step, no host sync.
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    total = torch.zeros(members, dtype=wide, device=device)
    failures: dict[int, NonFiniteLoss] = {}
    update = Update(optimizer)
    step = -1
    for step, (idx, inputs) in enumerate(batches):
        losses = loss(inputs)
        update.zero_grad()
        # A stack's summed losses: d(sum)/d(loss_k) = 1, each model gets its own gradient.
        (losses if losses.dim() == 0 else losses.sum()).backward()
        update.step()
        if schedule is not None:
            schedule.step()
        total += losses.detach()
        if on_step is not None:
            on_step(step, idx, losses.detach() if losses.dim() == 0 else losses.detach().mean())
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            _check(total, step, failures)
            if len(failures) == members:
                return step + 1, failures
    _check(total, step, failures)
    return step + 1, failures


def _check(total: torch.Tensor, step: int, failures: dict[int, NonFiniteLoss]) -> None:
    """Record, for models whose loss went non-finite since the last check (their sum of
    losses (K,) turned NaN or inf), the error for this check's window of steps."""
    for k in torch.nonzero(~torch.isfinite(total)).flatten().tolist():
        failures.setdefault(k, NonFiniteLoss(max(0, step - CHECK_EVERY + 1), step))


def train(
    model: nn.Module,
    data,  # TensorData or TokenData: n_train, device, train_batch
    objective: Objective,
    cfg: TrainConfig,
    data_seed: int,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train `model` in place; raises NonFiniteLoss if its loss goes NaN or inf."""
    start = time.perf_counter()
    device = data.device
    torch.manual_seed(data_seed)  # global RNG (dropout masks): same draws for every condition
    accel = accel_for(model, cfg, device)
    forward = prepare(model, accel)
    # an objective's own parameters (feature-map projections) train with the model's
    optimizer = make_optimizer([*model.parameters(), *objective_parameters(objective)], cfg)
    schedule = make_schedule(optimizer, cfg, total_steps(data.n_train, cfg))
    model.train()

    def loss(batch: Batch) -> torch.Tensor:
        with accel.autocast():
            logits = forward(accel.inputs(batch.x)).flatten(0, -2)  # (B, K) or (B * T, V)
        return objective(logits.float(), batch)  # fp32 logits: a no-op without autocast

    steps, failures = run_steps(_batches(data, cfg, data_seed), loss, optimizer, schedule, 1,
                                device, on_step)  # fmt: skip
    if failures:
        raise failures[0]
    engine = {"stack": None, **accel.describe()}
    return TrainResult(steps, time.perf_counter() - start, engine)


def _batches(data, cfg: TrainConfig, seed: int) -> Iterator[tuple[torch.Tensor, Batch]]:
    for idx in batch_order(data.n_train, cfg, seed):
        idx = idx.to(data.device, non_blocking=True)
        x, y = data.train_batch(idx, cfg.augment)
        yield idx, Batch(idx, x, y.reshape(-1))  # (B,) or, for sequences, (B * T,)
