"""Several models of one architecture trained at once, as one stacked model (torch.func).

The K models' parameters and buffers are stacked along a new leading dimension and one
vmapped `functional_call` computes all their logits in a single forward pass. Each model
computes its own objective on its slice of the logits (the paper's objectives in one pass
over the stack, `StackedLosses`: each model's gradient bit for bit its objective's alone)
and the K losses are summed, so each model's gradient is exactly the gradient of its own
loss. The optimizers are elementwise, so one over the stacked parameters updates each model
as its own optimizer would. Batch norm works per model: each normalises its own slice and
updates its own running statistics.

Runs of one data seed (the paired conditions of one student seed, PROTOCOL section 3) see
the same minibatches, the same augmentation draws and the same dropout masks when trained
alone. In a stack they share them outright: one batch per step, drawn from the one random
stream that `train` seeds with the data seed, dropout drawn once for all of them (vmap's
randomness="same"), and one teacher forward pass on the batch serving every KD student
(kdaudit.engine.teachers.model_targets). Runs of several data seeds stack too, each drawing its
batches from its own stream, but only if the model draws no random numbers in its forward
pass (`unstackable` says why not). Before the first step the stack checks that its first
model's logits and gradients equal the model's own (`_check_forward`): a draw vmap cannot
make as the model alone makes it (dropout on a transposed tensor, as after
nn.MultiheadAttention) refuses the stack, and the executor trains those runs one at a time.

A plain MLP (kdaudit's `mlp`: Linear and ReLU layers) skips vmap: its stacked forward is
written with batched multiplies of weights stored (K, in, out) (`_chain_forward`), which on a
2-core Xeon trained a stack of 7 default-audit MLPs at 0.86 to 1.0 ms a model and step
against 1.16 to 1.54 ms alone (the vmapped stack: 1.6 ms a model). On the CPU such a run
trains as a stack even alone (`train_one`, `stacks_alone`): its result is the same bit for
bit in any stack, so the local executor's workers stack a seed's runs while Ray and
`--workers 1` train them one at a time, all with the same bits.

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

from kdaudit.conditions.objectives import Batch, Objective, StackedLosses, objective_parameters
from kdaudit.config import TrainConfig
from kdaudit.engine.accel import accel_for, compiled
from kdaudit.engine.loop import (
    NonFiniteLoss,
    StepHook,
    TrainResult,
    batch_order,
    make_optimizer,
    make_schedule,
    run_steps,
    total_steps,
    train,
)


@dataclass
class Member:
    """One model of a stack: trained in place, as `train(model, data, objective, cfg,
    data_seed)` would train it alone."""

    model: nn.Module
    objective: Objective
    data_seed: int


def unstackable(models: list[nn.Module], data_seeds: list[int]) -> str | None:
    """Why these models cannot train as one stack (None: they can)."""
    dropout = _first_dropout(models[0])
    if len(set(data_seeds)) > 1 and dropout is not None:
        name, rate = dropout
        return (f"{name} has dropout {rate}: its masks come from the data seed's random "
                "stream, so only runs of one seed stack")  # fmt: skip
    return None


def random_draws(model: nn.Module) -> bool:
    """Whether the model draws random numbers in its training forward pass (dropout)."""
    return _first_dropout(model) is not None


def _first_dropout(model: nn.Module) -> tuple[str, float] | None:
    """(module name, rate) of the first module with active dropout, or None."""
    return next(((name or "model", _dropout_rate(m)) for name, m in model.named_modules()
                 if _dropout_rate(m) > 0), None)  # fmt: skip


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
    models = [m.model for m in members]
    streams = _Streams(members, cfg)
    if (reason := unstackable(models, streams.seeds)) is not None:
        raise ValueError(f"these models cannot train as one stack: {reason}")
    # channels_last does not apply: vmap turns the K models' convolutions into one grouped one
    accel = replace(accel_for(models[0], cfg, data.device), channels_last=False)
    chain = None if accel.compile else _linear_chain(models[0])
    state = StackedState(models, _weights(chain))
    eager = _stacked_forward(models[0], False, chain)
    forward = _stacked_forward(models[0], accel.compile, chain) if accel.compile else eager
    optimizer = make_optimizer(state.leaves, cfg)
    schedule = make_schedule(optimizer, cfg, total_steps(data.n_train, cfg))
    first = [True]
    together = StackedLosses.of([m.objective for m in members])  # None: one by one

    def losses(batches: list[Batch]) -> torch.Tensor:  # (K,)
        x = torch.stack([b.x for b in batches])  # (K, B, ...)
        if first[0]:
            _check_forward(state, models[0], x, eager)
            first[0] = False
        with accel.autocast():
            logits = forward(state.views(), state.buffers, x)  # (K, B, C) or (K, B, T, V)
        if together is not None:
            return together(logits.float(), batches)
        return _losses(members, logits.float(), batches)

    steps = ((batches[0].idx, batches) for batches in streams.batches(data))  # one Batch per member
    n_steps, failures = run_steps(steps, losses, optimizer, schedule, len(members), data.device,
                                  on_step)  # fmt: skip
    state.unstack(models)
    seconds = (time.perf_counter() - start) / len(members)  # each member's share
    engine = accel.describe()
    return [
        failures.get(k) or TrainResult(n_steps, seconds, {**engine, "stack": _where(k, members)})
        for k in range(len(members))
    ]


def stacks_alone(model: nn.Module, objective: Objective, device) -> bool:
    """Whether a run trains as a stack even alone (`train_one`): a plain MLP on the CPU
    (`_linear_chain`), with an objective that trains nothing of its own. Its result is then
    the same bit for bit in a stack of one or in any other (tests/test_stacked.py), so an
    executor may stack such runs or not, as is faster, without changing a bit: the local
    executor stacks a student seed's runs (kdaudit.executors.local), Ray and `--workers 1`
    train them one at a time."""
    cpu = torch.device(device).type == "cpu"
    return cpu and _linear_chain(model) is not None and not objective_parameters(objective)


def train_one(
    model: nn.Module, data, objective: Objective, cfg: TrainConfig, data_seed: int,
    on_step: StepHook | None = None, stack: bool = True,
) -> TrainResult:  # fmt: skip
    """`train`, or, for a run that `stacks_alone` (and `stack`), a stack of one."""
    if not (stack and stacks_alone(model, objective, data.device)):
        return train(model, data, objective, cfg, data_seed, on_step)
    (result,) = train_stacked([Member(model, objective, data_seed)], data, cfg, on_step)
    if isinstance(result, NonFiniteLoss):
        raise result
    return result


class StackMismatch(RuntimeError):
    """The stacked forward pass does not reproduce a model's own; train one at a time."""


# Largest difference of the stack's first logits and gradients from the model's own,
# relative to their scale, both computed in float64: rounding then stays below 1e-9 even in
# deep batch-norm networks (ResNet-50 at init amplifies fp32 rounding of its first-layer
# gradients to 1.5e-2, in float64 to 4e-15), while a different dropout mask moves them by a
# sizeable fraction of their scale.
FORWARD_TOLERANCE = 1e-6


def _check_forward(state: StackedState, model: nn.Module, x: torch.Tensor, forward) -> None:
    """The stack's first training step against its first model's alone, in float64 and
    eager (whatever the run's precision and compilation), from the same random state and
    batch-norm statistics, which both leave as they were: the logits and the gradient of a
    fixed random projection of them (logits alone can hide a difference, e.g. behind a
    zero-initialised head). Some draws a model makes alone cannot be made in a stack:
    dropout draws its mask in the memory order of its input, which vmap can change (a
    transposed attention output, as in nn.MultiheadAttention). Such a stack would train
    other models than the runs it stands for, so it is refused before it trains."""
    rng = _rng_state(x.device)
    x = x[:1].double() if x.is_floating_point() else x[:1]  # (1, B, ...): the first model
    one = {}  # one tensor per tied group, as functional_call requires
    views = {n: one.setdefault(id(v), _as_double(v[:1].detach()).requires_grad_())
             for n, v in state.views().items()}  # fmt: skip
    buffers = {n: _as_double(b[:1]) for n, b in state.buffers.items()}
    stacked = _probe(forward, views, buffers, x, lambda t: t[0], state.transposed)
    _set_rng_state(x.device, rng)
    single = {}
    params = {n: single.setdefault(id(v), state.as_model(n, v[0]).detach().requires_grad_())
              for n, v in views.items()}  # fmt: skip
    buffers = {n: _as_double(b[0]) for n, b in state.buffers.items()}
    skeleton = copy.deepcopy(model).to("meta").train()
    alone_forward = lambda p, b, z: functional_call(skeleton, (p, b), (z,))  # noqa: E731
    alone = _probe(alone_forward, params, buffers, x[0], lambda t: t)
    _set_rng_state(x.device, rng)
    gap = ((stacked - alone).abs().max() / alone.abs().max().clamp_min(1e-30)).item()
    if not gap <= FORWARD_TOLERANCE:
        raise StackMismatch(
            f"a stacked {type(model).__name__} trains otherwise than alone (relative "
            f"difference {gap:.2g} in float64), most likely with other dropout masks"
        )


def _as_double(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a floating tensor, a clone of another (batch-norm counts): always a
    copy, so the check leaves the stack's tensors as they were."""
    return t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone()


def _probe(forward, params: dict, buffers: dict, x, first, transposed=frozenset()) -> torch.Tensor:
    """The logits and the gradient of <logits, R> for a fixed R, flattened, of the model
    that `first` takes out of a stacked tensor (or out of one model's: the identity), each
    gradient in the model's layout (`transposed`: parameters given transposed)."""
    with torch.enable_grad():
        logits = forward(params, buffers, x)
    z = first(logits)
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    named = {id(v): (n, v) for n, v in reversed(params.items())}  # the first name of each
    names, tensors = zip(*reversed(named.values()), strict=True)
    grads = torch.autograd.grad((z * r).sum(), tensors, allow_unused=True)
    parts = [first(g).mT if n in transposed else first(g)
             for n, g in zip(names, grads, strict=True) if g is not None]  # fmt: skip
    return torch.cat([z.detach().flatten(), *(g.flatten() for g in parts)])


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Streams:
    """The members' minibatches: per data seed its `batch_order` and its random stream for the
    augmentation draws, the stream `train` seeds with the data seed. Members of one seed get
    the same Batch object, which lets their KD objectives share one teacher forward pass."""

    def __init__(self, members: list[Member], cfg: TrainConfig):
        self.cfg = cfg
        self.seeds = list(dict.fromkeys(m.data_seed for m in members))  # distinct, in order
        self.of_member = [self.seeds.index(m.data_seed) for m in members]
        self.rng = [torch.Generator().manual_seed(s).get_state() for s in self.seeds]

    def batches(self, data) -> Iterator[list[Batch]]:
        if len(self.seeds) == 1:  # as `train` does: dropout masks come from this stream too
            torch.manual_seed(self.seeds[0])
        orders = [batch_order(data.n_train, self.cfg, s) for s in self.seeds]
        for indices in zip(*orders, strict=True):
            per_seed = [self._batch(data, j, idx) for j, idx in enumerate(indices)]
            yield [per_seed[j] for j in self.of_member]

    def _batch(self, data, j: int, idx: torch.Tensor) -> Batch:
        idx = idx.to(data.device, non_blocking=True)
        if self.cfg.augment == "none" or len(self.seeds) == 1:  # no swap: the global stream
            x, y = data.train_batch(idx, self.cfg.augment)
            return Batch(idx, x, y.reshape(-1))
        outside = torch.get_rng_state()
        torch.set_rng_state(self.rng[j])
        try:
            x, y = data.train_batch(idx, self.cfg.augment)
            self.rng[j] = torch.get_rng_state()
        finally:
            torch.set_rng_state(outside)
        return Batch(idx, x, y.reshape(-1))


def _stacked_forward(model: nn.Module, compile: bool, chain: list | None = None):
    """(params, buffers, x) -> logits, vmapped over the leading (model) dimension of all
    three, in training mode. Random draws (dropout) are made once for all K models, which
    is what models of one data seed draw alone; `unstackable` keeps other stacks free of
    them. The skeleton holds the architecture only (on the meta device)."""
    if compile:
        return compiled(model, stacked=True)
    if chain is not None:  # a plain MLP, its weights stored transposed (StackedState)
        return _chain_forward(chain)
    skeleton = copy.deepcopy(model).to("meta").train()

    def one(params, buffers, x):
        return functional_call(skeleton, (params, buffers), (x,))

    return vmap(one, in_dims=(0, 0, 0), randomness="same")


def _linear_chain(model: nn.Module) -> list[tuple[str, str]] | None:
    """A plain MLP (an nn.Sequential of nn.Linear with bias and nn.ReLU, an nn.Flatten
    first allowed: kdaudit's `mlp`) as its layers' (kind, name), or None for any other model."""
    if type(model) is not nn.Sequential:
        return None
    kinds = {nn.Linear: "linear", nn.ReLU: "relu", nn.Flatten: "flatten"}
    chain = []
    for name, layer in model.named_children():
        kind = kinds.get(type(layer))
        if kind is None or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if kind == "linear" and layer.bias is None:
            return None
        if kind == "flatten" and (chain or (layer.start_dim, layer.end_dim) != (1, -1)):
            return None
        chain.append((kind, name))
    return chain if any(kind == "linear" for kind, _ in chain) else None


def _weights(chain: list[tuple[str, str]] | None) -> frozenset[str]:
    """The weights of a plain MLP's linear layers: stacked transposed, (K, in, out)."""
    return frozenset(f"{name}.weight" for kind, name in chain or () if kind == "linear")


def _chain_forward(chain: list[tuple[str, str]]):
    """A plain MLP's stacked forward pass written with batched matrix multiplies: each layer
    one baddbmm of the K models' (K, B, in) activations by their (K, in, out) weights, stored
    so (`_weights`), the bias added in it as alone (addmm). The weights' gradients then come
    out of the batched multiply in the layout they are stored in, with no transposing copy,
    and no functional call per layer (vmap's path, whose Python and dispatch a small MLP's
    step pays several times over: benchmarks/profile_step.py --stack)."""

    def forward(params, buffers, x):  # x: (K, B, ...)
        h = x
        for kind, name in chain:
            if kind == "flatten":
                h = h.flatten(2)
            elif kind == "relu":
                h = torch.relu(h)
            else:
                weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
                h = torch.baddbmm(bias.unsqueeze(1), h, weight)
        return h

    return forward


# Fused optimizers run a tensor's last (numel mod vector width) elements through scalar code
# that rounds differently from the vector code (FMA). Padding every stacked parameter to a
# multiple of PAD elements leaves no such tail: each model's update is then independent of
# its position in the stack and of the stack's size. The padding's gradient is zero and
# stays so (Adam, SGD and weight decay keep a zero element at zero).
PAD = 64


class StackedState:
    """The K models' parameters, each stacked (K, ...) inside a flat zero-padded leaf
    (ceil(K * numel / PAD) * PAD,) that the optimizer updates, and their buffers (batch norm
    statistics), stacked (K, ...) and updated in place by the forward pass. `transposed`
    parameters (a plain MLP's weights: `_chain_forward`) are stacked (K, in, out)."""

    def __init__(self, models: list[nn.Module], transposed: frozenset[str] = frozenset()):
        stacked, self.buffers = stack_module_state(models)  # name -> (K, ...)
        self.transposed = transposed  # parameters stacked transposed: (K, in, out)
        stacked = {name: t.mT if name in transposed else t for name, t in stacked.items()}
        self.shapes = {name: t.shape for name, t in stacked.items()}
        self._leaves = {name: _padded(t) for name, t in stacked.items()}
        self.names = _parameter_names(models[0])

    @property
    def leaves(self) -> list[torch.Tensor]:
        return list(self._leaves.values())

    def views(self) -> dict[str, torch.Tensor]:
        """Every parameter name -> its (K, ...) view of a leaf; tied names share one view."""
        views = {name: _view(leaf, self.shapes[name]) for name, leaf in self._leaves.items()}
        return {name: views[canonical] for name, canonical in self.names.items()}

    def as_model(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A stored parameter (one model's, or the stack's) in the model's own layout."""
        return t.mT if name in self.transposed else t

    @torch.no_grad()
    def unstack(self, models: list[nn.Module]) -> None:
        """Copy model k's trained parameters and its buffers back into models[k]."""
        views = self.views()
        for k, model in enumerate(models):
            for name, p in model.named_parameters(remove_duplicate=False):
                p.copy_(self.as_model(name, views[name][k]))
            for name, b in model.named_buffers():
                b.copy_(self.buffers[name][k])


def _view(leaf: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The (K, ...) parameter in its leaf; a leaf without padding is the parameter itself,
    reshaped, whose gradient then lands in the leaf's without a copy."""
    return leaf.view(shape) if leaf.numel() == shape.numel() else leaf[: shape.numel()].view(shape)


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
    """(K,): each model's objective on its batch, one by one."""
    # Each objective sees its model's logits flattened as alone: (B, C) or (B * T, V).
    return torch.stack(
        [m.objective(z.flatten(0, -2), b) for m, z, b in zip(members, logits, batches, strict=True)]
    )


def _where(k: int, members: list[Member]) -> dict:
    return {"size": len(members), "index": k, "data_seeds": [m.data_seed for m in members]}
