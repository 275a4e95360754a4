"""Two published knowledge-distillation losses, written as kdaudit user losses.

Every function has the signature of a kdaudit user loss::

    fn(student_logits, teacher_logits, labels, alpha, temperature) -> loss

student_logits and teacher_logits are (B, K) logits, labels is (B,) int64, alpha in [0, 1] weighs
the teacher term, temperature > 0, and the loss is a 0-d tensor (mean over the batch). Both keep
the (1 - alpha) * CE + alpha * T^2 * (teacher term) shape of the built-in KD loss (Hinton et al.),
with CE at T = 1, and both work in log space (log_softmax / logsumexp, never log of a softmax).

Sources:

- ``reverse_kl``: Yuxian Gu, Li Dong, Furu Wei, Minlie Huang, "MiniLLM: Knowledge Distillation of
  Large Language Models", arXiv 2023 / ICLR 2024. The reverse, mode-seeking KL(student || teacher).
- ``dkd``: Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiu, Jiajun Liang, "Decoupled Knowledge
  Distillation", CVPR 2022. KD split into a target-class (TCKD) and a non-target-class (NCKD) term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DKD_BETA", "dkd", "dkd_parts", "reverse_kl"]

DKD_BETA = 8.0  # weight of NCKD: the DKD paper's default (its CIFAR-100 setting)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum_k p_k (log p_k - log q_k) from (B, K) log-probabilities -> (B,)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, temperature: float
) -> Tensor:
    """(1 - alpha) * CE(y, softmax(z_s)) + alpha * T^2 * KL(softmax(z_s/T) || softmax(z_t/T)).

    KL is batchmean (sum over classes, mean over examples): the reverse (mode-seeking) KL of
    MiniLLM, with the student distribution q weighting log(q / p).
    """
    ce = F.cross_entropy(student_logits, labels)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (B, K) student
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, K) teacher
    kl = _kl_rows(log_q, log_p).mean()
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def _binary_and_nontarget(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """DKD's two views of softmax(logits) at one temperature (logits already divided by T).

    Returns the binary log-probabilities (B, 2) = [log p_true, log(1 - p_true)] and the
    non-target log-softmax (B, K) with the true class renormalised away (set to 0 there, so both
    views stay finite; callers zero that column's KL contribution via matching zeros).
    """
    lse_all = torch.logsumexp(logits, dim=-1)  # (B,)
    masked = logits.masked_fill(target, float("-inf"))  # (B, K), true class removed
    # log(1 - p_true) = logsumexp over the other classes - logsumexp over all: no cancellation
    # in 1 - p when p_true is close to 1.
    log_rest = torch.logsumexp(masked, dim=-1) - lse_all  # (B,)
    log_true = logits.masked_select(target) - lse_all  # (B,): one True per row, in row order
    binary = torch.stack([log_true, log_rest], dim=-1)  # (B, 2)
    # log_softmax is -inf in the removed column; replace it with 0 so that KL's exp(t) * (t - s)
    # there is 1 * (0 - 0) = 0 instead of 0 * nan.
    nontarget = F.log_softmax(masked, dim=-1).masked_fill(target, 0.0)  # (B, K)
    return binary, nontarget


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-example (TCKD, NCKD), each (B,), at temperature T.

    TCKD = KL(b_t || b_s) over the binary distribution (p_true, 1 - p_true); NCKD = KL(p̂_t || p̂_s)
    over the non-target classes renormalised. Eq. (1) of the DKD paper:
    KL(p_t || p_s) = TCKD + (1 - p_t,true) * NCKD.
    """
    target = F.one_hot(labels, student_logits.shape[-1]).bool()  # (B, K), True at the label
    b_s, n_s = _binary_and_nontarget(student_logits / temperature, target)
    b_t, n_t = _binary_and_nontarget(teacher_logits / temperature, target)
    return _kl_rows(b_t, b_s), _kl_rows(n_t, n_s)


def dkd(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, temperature: float
) -> Tensor:
    """(1 - alpha) * CE(y, softmax(z_s)) + alpha * T^2 * (TCKD + DKD_BETA * NCKD).

    TCKD and NCKD as in ``dkd_parts``, each batchmean (mean over examples). The paper writes
    alpha * TCKD + beta * NCKD; here alpha is kdaudit's teacher weight and TCKD's weight is 1.
    """
    ce = F.cross_entropy(student_logits, labels)
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)  # (B,), (B,)
    return (1.0 - alpha) * ce + alpha * temperature**2 * (tckd + DKD_BETA * nckd).mean()
