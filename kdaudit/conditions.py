"""Training conditions (PROTOCOL section 2): one loss form, different targets.

A condition builds an *objective*, `objective(logits, batch) -> loss`. The training loop
is the same for every condition; only the objective differs. KD gets the teacher's logits
for a batch from a `TeacherTargets` callable: cached per example when the student sees the
training data unaugmented, or a teacher forward pass on the augmented batch otherwise.
Feature-map conditions (kdaudit.features) are objectives that hook the student model and
train parameters of their own; the loop adds those to the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdaudit.registry import Registry
from kdaudit.stats import Design


@dataclass(frozen=True)
class Batch:
    idx: torch.Tensor  # (B,) training-set indices
    x: torch.Tensor  # (B, ...) model inputs, after augmentation and normalisation
    y: torch.Tensor  # (B,) labels


Objective = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits (B, K), batch) -> loss
TeacherTargets = Callable[[Batch], torch.Tensor]  # batch -> teacher logits (B, K)

# info: params = the grid axes the protocol expands; needs_teacher = uses teacher outputs;
# control = a control condition; controls = for a treatment (a condition the statistics
# test), the controls its verdict needs, in order; also_compared = controls tested against it
# when present, outside the verdict; features = a feature-map objective (kdaudit.features):
# built with the student model, holds parameters and hooks, needs the teacher model itself.
# A control is matched to a treatment's setting on the control's own params.
CONDITIONS: Registry[Objective] = Registry("condition")
PLAIN = dict(controls=(), also_compared=(), features=False)  # info of a non-treatment


def distillation_loss(
    logits: torch.Tensor,  # (B, K) student logits
    labels: torch.Tensor,  # (B,)
    target_log_probs: torch.Tensor,  # (B, K) or (1, K): log of the softened target distribution
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - alpha) CE(y, softmax(z)) + alpha T^2 KL(target || softmax(z / T)), KL batchmean."""
    ce = F.cross_entropy(logits, labels)
    log_q = F.log_softmax(logits / temperature, dim=-1)
    target = target_log_probs.expand_as(log_q)
    kl = F.kl_div(log_q, target, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def _cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits, batch.y)


@CONDITIONS.register("teacher", params=(), needs_teacher=False, control=False, **PLAIN)
def teacher(alpha, temperature, num_classes, teacher_targets) -> Objective:
    return _cross_entropy


@CONDITIONS.register("siddo", params=(), needs_teacher=False, control=True, **PLAIN)
def siddo(alpha, temperature, num_classes, teacher_targets) -> Objective:
    """Same init, different data order: plain CE, the independent-model control."""
    return _cross_entropy


@CONDITIONS.register("kd", params=("alpha", "temperature"), needs_teacher=True, control=False,
                     controls=("siddo", "rcd"), also_compared=("ls",), features=False)  # fmt: skip
def kd(alpha, temperature, num_classes, teacher_targets: TeacherTargets) -> Objective:
    """Target: the trained teacher's softened distribution on the same batch."""

    def objective(logits, batch):
        z_t = teacher_targets(batch).to(logits.dtype)  # (B, K)
        target = F.log_softmax(z_t / temperature, dim=-1)
        return distillation_loss(logits, batch.y, target, alpha, temperature)

    return objective


@CONDITIONS.register("rcd", params=("alpha", "temperature"), needs_teacher=False, control=True,
                     **PLAIN)  # fmt: skip
def rcd(alpha, temperature, num_classes, teacher_targets) -> Objective:
    """Random control distillation: the KD loss form with the class-uniform target 1/K."""
    uniform = torch.full((1, num_classes), -math.log(num_classes), dtype=torch.float64)

    def objective(logits, batch):
        target = uniform.to(logits.device, logits.dtype)
        return distillation_loss(logits, batch.y, target, alpha, temperature)

    return objective


@CONDITIONS.register("ls", params=("alpha",), needs_teacher=False, control=True, **PLAIN)
def ls(alpha, temperature, num_classes, teacher_targets) -> Objective:
    """Label smoothing with epsilon = alpha (an appendix control, equivalent to RCD at T=1)."""

    def objective(logits, batch):
        return F.cross_entropy(logits, batch.y, label_smoothing=alpha)

    return objective


def build_objective(
    name: str,
    alpha,
    temperature,
    num_classes: int,
    teacher=None,  # TeacherTargets; a kdaudit.features.FeatureSetup for feature conditions
    student: nn.Module | None = None,  # the model to train (feature conditions hook it)
) -> Objective:
    entry = CONDITIONS.get(name)
    if entry.info["needs_teacher"] and teacher is None:
        raise ValueError(f"condition {name!r} needs the teacher's outputs")
    if not entry.info["features"]:
        return entry.build(alpha, temperature, num_classes, teacher)
    if student is None:
        raise ValueError(f"condition {name!r} hooks the student: pass student=")
    return entry.build(alpha, temperature, num_classes, teacher, student)


def objective_parameters(objective: Objective) -> list[torch.Tensor]:
    """Parameters an objective trains beside the model's (feature-map projections)."""
    return list(objective.parameters()) if isinstance(objective, nn.Module) else []


def feature_condition(name: str) -> bool:
    return CONDITIONS.get(name).info["features"]


def designs() -> dict[str, Design]:
    """Per treatment (in registration order), its controls, each matched to a treatment's
    setting on the control's own params."""
    matched = lambda names: {c: CONDITIONS.get(c).info["params"] for c in names}  # noqa: E731
    return {
        e.name: Design(matched(e.info["controls"]), matched(e.info["also_compared"]))
        for e in CONDITIONS.entries()
        if e.info["controls"]
    }


def verdict_controls(treatment: str) -> tuple[str, ...]:
    return CONDITIONS.get(treatment).info["controls"]


def cached_targets(train_logits: torch.Tensor) -> TeacherTargets:
    """The teacher's logits on the unaugmented training set (N, K), looked up per batch."""
    return lambda batch: train_logits[batch.idx]


def model_targets(teacher: torch.nn.Module) -> TeacherTargets:
    """A forward pass of the (eval-mode) teacher on the batch the student sees. The last
    batch's outputs are kept: students trained as one stack (kdaudit.stacked) are handed the
    same Batch, and one teacher forward pass serves them all."""
    teacher.eval()
    last: list = [None, None]  # [the batch's inputs (kept alive, so never a reused id), logits]

    def targets(batch: Batch) -> torch.Tensor:
        if last[0] is not batch.x:
            with torch.no_grad():
                last[:] = batch.x, teacher(batch.x).flatten(0, -2)  # (B, K) or (B * T, V)
        return last[1]

    return targets


# The feature-map conditions (fmkd, fmrc) register themselves; imported last, as they build on
# the names above.
from kdaudit import features  # noqa: E402, F401
