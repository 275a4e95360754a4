"""Training conditions (PROTOCOL section 2): one loss form, different targets.

A condition builds an *objective*, `objective(logits, labels, idx) -> loss`, where `idx`
are the training-set indices of the batch (used to look up cached teacher outputs). The
training loop is the same for every condition; only the objective differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdaudit.registry import Registry

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# info: params = the grid axes the protocol expands; needs_teacher = uses teacher outputs;
# control = a control condition (compared against KD in the statistics).
CONDITIONS: Registry[Objective] = Registry("condition")


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


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


@CONDITIONS.register("teacher", params=(), needs_teacher=False, control=False)
def teacher(alpha, temperature, num_classes, teacher_logits) -> Objective:
    return _cross_entropy


@CONDITIONS.register("siddo", params=(), needs_teacher=False, control=True)
def siddo(alpha, temperature, num_classes, teacher_logits) -> Objective:
    """Same init, different data order: plain CE, the independent-model control."""
    return _cross_entropy


@CONDITIONS.register("kd", params=("alpha", "temperature"), needs_teacher=True, control=False)
def kd(alpha, temperature, num_classes, teacher_logits) -> Objective:
    """Target: the trained teacher's softened distribution on the same batch."""

    def objective(logits, labels, idx):
        target = F.log_softmax(teacher_logits[idx].to(logits.dtype) / temperature, dim=-1)
        return distillation_loss(logits, labels, target, alpha, temperature)

    return objective


@CONDITIONS.register("rcd", params=("alpha", "temperature"), needs_teacher=False, control=True)
def rcd(alpha, temperature, num_classes, teacher_logits) -> Objective:
    """Random control distillation: the KD loss form with the class-uniform target 1/K."""
    uniform = torch.full((1, num_classes), -math.log(num_classes), dtype=torch.float64)

    def objective(logits, labels, idx):
        target = uniform.to(logits.device, logits.dtype)
        return distillation_loss(logits, labels, target, alpha, temperature)

    return objective


@CONDITIONS.register("ls", params=("alpha",), needs_teacher=False, control=True)
def ls(alpha, temperature, num_classes, teacher_logits) -> Objective:
    """Label smoothing with epsilon = alpha (an appendix control, equivalent to RCD at T=1)."""

    def objective(logits, labels, idx):
        return F.cross_entropy(logits, labels, label_smoothing=alpha)

    return objective


def build_objective(name: str, alpha, temperature, num_classes: int, teacher_logits=None):
    entry = CONDITIONS.get(name)
    if entry.info["needs_teacher"] and teacher_logits is None:
        raise ValueError(f"condition {name!r} needs the teacher's training-set outputs")
    return entry.build(alpha, temperature, num_classes, teacher_logits)
