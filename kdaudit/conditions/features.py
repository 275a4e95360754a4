"""Feature-map matching KD (`fmkd`) and its control (`fmrc`), PROTOCOL section 2.

    L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * mean over modules m of MSE(P_m(f_s,m), g_m)

f_s,m is the output of the student's module m, taken through a forward hook (no model
edits); P_m is a learned linear map over the channel dimension to the teacher's width when
the widths differ (the identity otherwise), trained by the student's optimizer; MSE is the
mean over all elements. The modules are named in the config (`protocol.feature_modules`,
and `protocol.teacher_feature_modules` where the teacher's names differ).

- `fmkd`: g_m is the output of the teacher's module m on the batch the student sees (a
  teacher forward pass per batch, eval mode, no gradients).
- `fmrc` (feature-map random control), the decision for "a fixed random tensor of the same
  shape and scale": per module ONE tensor of the shape of one example's teacher feature
  (e.g. (C,) for an MLP layer, (T, C) for a transformer block), drawn once from N(0, 1)
  with a seed derived from the run's data seed (so each student seed draws its own) and
  multiplied by the standard deviation (over all elements) of the teacher's feature on a
  fixed probe set (the first PROBE training examples, unaugmented). The same tensor is the target of every
  example of every batch, like RCD's uniform target: it carries the teacher's feature
  shape and scale and nothing else.

The channel dimension is the one dimension where the student's and teacher's feature
shapes differ; equal shapes need no projection. P_m is initialised (nn.Linear's default)
from a seed derived from the run's init seed, inside a forked RNG, so building it leaves
the global RNG stream (init, dropout) exactly as for the other conditions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdaudit.conditions.objectives import Batch

PROBE = 256  # training examples (windows, for text) that fix the feature shapes and scale


@dataclass(frozen=True)
class FeatureSetup:
    """What a feature-map objective needs besides the student: its teacher's side."""

    teacher: nn.Module  # the trained teacher, on the student's device
    modules: tuple[tuple[str, str], ...]  # (student module, teacher module) pairs
    probe: torch.Tensor  # (P, ...) unaugmented training inputs
    init_seed: int  # the run's: seeds the projections
    data_seed: int  # the run's: seeds the control's fixed tensors


def derived_seed(purpose: str, *seeds: int) -> int:
    """A seed for `purpose` that is a pure function of the run's seeds (63 bits)."""
    digest = hashlib.sha256(f"{purpose}:{seeds}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def find_modules(model: nn.Module, names: tuple[str, ...], role: str) -> list[nn.Module]:
    """The named submodules, or a clear error listing the names that exist."""
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table or not n]
    if missing:
        available = ", ".join(n for n in table if n)
        raise ValueError(
            f"protocol.feature_modules: the {role} has no module {missing[0]!r}; "
            f"its modules: {available}"
        )
    return [table[n] for n in names]


class FeatureTaps:
    """Forward hooks keeping the latest output of each named module: by default only while
    it trains, so that eval passes (the final evaluation) keep nothing."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], role: str, training_only=True):
        self.outputs: dict[int, torch.Tensor] = {}
        self.training_only = training_only
        self.handles = [
            module.register_forward_hook(self._keeper(i))
            for i, module in enumerate(find_modules(model, names, role))
        ]

    def _keeper(self, i: int) -> Callable:
        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"feature module {type(module).__name__} returns no tensor")
            if module.training or not self.training_only:
                self.outputs[i] = output

        return keep

    def take(self) -> list[torch.Tensor]:
        """The features of the last forward pass, in module order; cleared."""
        if len(self.outputs) != len(self.handles):
            raise RuntimeError("a feature module did not run in the last training forward pass")
        return [self.outputs.pop(i) for i in range(len(self.handles))]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def module_outputs(model: nn.Module, names: tuple[str, ...], x: torch.Tensor, role: str) -> list:
    """The named modules' outputs on x (each (B, ...)), in eval mode; the hooks live for this
    one pass (the teacher is shared by every student of a worker)."""
    taps = FeatureTaps(model, names, role, training_only=False)
    training = model.training
    model.eval()
    try:
        model(x)
        return taps.take()
    finally:
        model.train(training)
        taps.remove()


def channel_dim(student: torch.Size, teacher: torch.Size) -> int | None:
    """The one dimension where the feature shapes differ (None: equal shapes)."""
    if len(student) != len(teacher):
        raise ValueError(f"feature shapes {tuple(student)} and {tuple(teacher)} differ in rank")
    differ = [d for d in range(1, len(student)) if student[d] != teacher[d]]
    if len(differ) > 1 or student[0] != teacher[0]:
        raise ValueError(
            f"student feature {tuple(student)} and teacher feature {tuple(teacher)} differ in "
            "more than the channel dimension; a linear projection cannot match them"
        )
    return differ[0] if differ else None


class Projection(nn.Module):
    """A linear map over one dimension (the channels) of a feature map."""

    def __init__(self, dim: int, width_in: int, width_out: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(width_in, width_out)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, ..., C_s, ...) -> C_t
        return self.linear(f.movedim(self.dim, -1)).movedim(-1, self.dim)


def projections(shapes: list[tuple[torch.Size, torch.Size]], seed: int) -> nn.ModuleList:
    """One Projection (or Identity) per module, initialised from `seed` alone."""
    with torch.random.fork_rng(devices=[]):  # the global stream stays the other runs'
        torch.manual_seed(seed)
        return nn.ModuleList(_projection(s, t) for s, t in shapes)


def _projection(student: torch.Size, teacher: torch.Size) -> nn.Module:
    dim = channel_dim(student, teacher)
    return nn.Identity() if dim is None else Projection(dim, student[dim], teacher[dim])


class FeatureMatch(nn.Module):
    """The objective (logits, batch) -> loss; its parameters are the projections'."""

    def __init__(self, taps: FeatureTaps, proj: nn.ModuleList, targets, alpha: float):
        super().__init__()
        self.taps, self.proj, self.alpha = taps, proj, alpha
        self.targets: Callable[[Batch], list[torch.Tensor]] = targets

    def forward(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        ce = F.cross_entropy(logits, batch.y)
        student = self.taps.take()  # each (B, ...) from the forward pass that made logits
        teacher = self.targets(batch)
        mse = [_mse(p(s.float()), t) for p, s, t in zip(self.proj, student, teacher, strict=True)]
        return (1.0 - self.alpha) * ce + self.alpha * torch.stack(mse).mean()


def _mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; a (1, ...) target broadcasts over the batch."""
    return (student - target.to(student.dtype)).pow(2).mean()


def _probe_features(setup: FeatureSetup, student: nn.Module) -> tuple[list, list]:
    """Student and teacher features on the probe set: shapes (and the teacher's scale)."""
    s_names, t_names = zip(*setup.modules, strict=True)
    return (
        module_outputs(student, s_names, setup.probe, "student"),
        module_outputs(setup.teacher, t_names, setup.probe, "teacher"),
    )


def feature_objective(setup: FeatureSetup, student: nn.Module, alpha: float, control: bool):
    """The fmkd objective, or with `control` the fmrc one (module doc)."""
    s_feats, t_feats = _probe_features(setup, student)
    shapes = [(s.shape, t.shape) for s, t in zip(s_feats, t_feats, strict=True)]
    proj = projections(shapes, derived_seed("projection", setup.init_seed))
    proj = proj.to(setup.probe.device)
    targets = fixed_targets(t_feats, setup.data_seed) if control else teacher_features(setup)
    taps = FeatureTaps(student, tuple(s for s, _ in setup.modules), "student")
    return FeatureMatch(taps, proj, targets, alpha)


def teacher_features(setup: FeatureSetup) -> Callable[[Batch], list[torch.Tensor]]:
    """The teacher's features on the batch the student sees, each (B, ...)."""
    names = tuple(t for _, t in setup.modules)
    return lambda batch: module_outputs(setup.teacher, names, batch.x, "teacher")


def fixed_targets(teacher: list[torch.Tensor], seed: int) -> Callable[[Batch], list]:
    """The control's targets: per module one N(0, 1) tensor of one example's feature shape,
    times the teacher feature's standard deviation on the probe set; each (1, ...)."""
    gen = torch.Generator().manual_seed(derived_seed("fmrc", seed))
    fixed = [
        torch.randn(t.shape[1:], generator=gen, dtype=torch.float64).mul(t.double().std())
        .float().unsqueeze(0).to(t.device)
        for t in teacher
    ]  # fmt: skip
    return lambda batch: fixed


def fmkd(condition, alpha, temperature, num_classes, setup: FeatureSetup, student: nn.Module):
    """Feature-map matching: student features regressed on the teacher's, same batch."""
    return feature_objective(setup, student, alpha, control=False)


def fmrc(condition, alpha, temperature, num_classes, setup: FeatureSetup, student: nn.Module):
    """Feature-map random control: the fmkd loss with fixed random targets (module doc)."""
    return feature_objective(setup, student, alpha, control=True)
