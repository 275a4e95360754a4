"""Top-k inputs: a model known, at each position, only by its k most probable classes and
their log-probabilities (what serving stacks and APIs return), and the top-k view of one
chunk of rows that kdaudit.metrics.streaming computes every metric from.

Definitions, per position, with V classes, S_t and S_c the teacher's and the model's top-k
class sets and p(i) = exp(log-probability) (natural log, as stored; float64 arithmetic):

- ranking: the k classes by descending log-probability, ties to the lower class id (as the
  stable sort of full logits); top-1 is the first. Top-1 agreement, the correct/incorrect
  split, accuracy and VoI follow exactly.
- tail mass: r = 1 - sum over S of p(i), computed as -expm1(logsumexp) and clamped at 0.
- tail estimate: a model's mass outside its top-k is taken as spread evenly over the V - k
  classes outside it, p(i) = r / (V - k) for i not in S (the maximum-entropy fill; it
  never exceeds p of the k-th class when S really is the top-k).
- loss: -log p(y) where the label y is in the model's top-k (exact); else the tail estimate
  -log(max(r, eps) / (V - k)), eps the machine epsilon of the stored log-probabilities
  (below it the tail cannot be told from 0). `n_label_outside_topk` counts those positions.
- rank disagreement: over the k ranks, the share of (position, rank < k) pairs whose classes
  differ; topk_overlap: |S_t & S_c| / k.
- JS divergence and activation distance ("top-k approx."): over the bins of the union
  U = S_t | S_c plus one tail bin for the V - |U| other classes; each model's mass on a
  class of the other's top-k that is outside its own is its tail estimate, and its tail bin
  holds r (V - |U|) / (V - k). Each distribution still sums to 1, and the JS divergence
  equals that of the two V-class distributions filled with the tail estimate (splitting a
  bin in proportion changes no JS term); the L2 norm counts the tail as one bin.
- Procrustes distance ("top-k approx."): from the V-class distributions filled with the
  tail estimate (computed only up to procrustes_max_classes, as for full logits).

With k = V the tail is empty and every definition is the full-logit one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# What is wrong with a row of a top-k input, in the order the errors are reported.
PROBLEMS = {
    "ids": "topk_ids outside [0, vocab_size)",
    "repeated": "topk_ids repeat a class within a row",
    "non_finite": "non-finite topk_logprobs (nan or inf)",
    "mass": "topk_logprobs sum to a probability above 1 (store natural-log probabilities, "
    "e.g. log_softmax outputs, not logits)",
}


@dataclass(frozen=True)
class TopK:
    """One model's top-k log-probabilities.

    ids: (..., k) integer class ids, distinct within a row; logprobs: (..., k) natural-log
    probabilities of those classes, in any order along the last axis (the same as ids);
    vocab_size: V, the number of classes. ids and logprobs are tensors, numpy arrays or
    RowSources (kdaudit.metrics.streaming) of the same shape.
    """

    ids: Any
    logprobs: Any
    vocab_size: int

    def __post_init__(self) -> None:
        ids, lp = tuple(self.ids.shape), tuple(self.logprobs.shape)
        if ids != lp:
            raise ValueError(f"top-k shape mismatch: topk_ids {ids} but topk_logprobs {lp}; "
                             "pass one log-probability per id")  # fmt: skip
        if len(ids) < 2 or ids[-1] < 1:
            raise ValueError(f"top-k arrays have shape {ids}; need (..., k) with k >= 1")
        if int(self.vocab_size) != self.vocab_size or self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size}; pass the number of classes (>= 2)")
        if ids[-1] > self.vocab_size:
            raise ValueError(f"top-k arrays hold k={ids[-1]} ids per row but vocab_size is "
                             f"{self.vocab_size}; k must be at most vocab_size")  # fmt: skip
        for name, array, integer in (("topk_ids", self.ids, True),
                                     ("topk_logprobs", self.logprobs, False)):  # fmt: skip
            _check_dtype(name, getattr(array, "dtype", None), integer)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.logprobs.shape)

    @property
    def k(self) -> int:
        return self.shape[-1]


def _check_dtype(name: str, dtype, integer: bool) -> None:
    if dtype is None:  # a RowSource without a dtype: checked chunk by chunk
        return
    if is_integer_dtype(dtype) != integer:
        want = "integer class ids" if integer else "floating-point log-probabilities"
        raise ValueError(f"{name} has dtype {dtype}; pass {want}")


def is_integer_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.dtype(dtype).kind in "iu"


def resolution(dtype: torch.dtype) -> float:
    """The machine epsilon of stored log-probabilities: below it a tail mass is noise."""
    return float(torch.finfo(dtype).eps)


class TopkChunk:
    """One model's top-k view of a chunk of B rows: ranked ids and float64 log-probs, its
    tail mass and the per-class tail estimate. The same interface as a full-logit chunk
    (order, aligned, nll, dense_probs), so every accumulator takes either."""

    def __init__(self, order, log_p, vocab: int, floor: float, by_id=None, log_p_by_id=None):
        """order: (B, k) int64 ids ranked; log_p: (B, k) float64, in that order; by_id and
        log_p_by_id: the same sorted by id, when the caller has them."""
        self.order, self.log_p, self.vocab, self.floor = order, log_p, vocab, floor
        self.k = order.shape[1]
        self.tail = (-torch.expm1(torch.logsumexp(log_p, dim=1))).clamp_min(0.0)  # (B,) r
        outside = vocab - self.k
        self.log_fill = (  # (B,) log(r / (V - k)); -inf when nothing is outside
            torch.log(self.tail) - math.log(outside)
            if outside
            else torch.full_like(self.tail, -math.inf)
        )
        if by_id is None:
            by_id, perm = torch.sort(order, dim=1)
            log_p_by_id = log_p.gather(1, perm)
        self.by_id, self.log_p_by_id = by_id, log_p_by_id  # (B, k) for lookups by id
        self.problems: dict[str, torch.Tensor] = {}
        self._nll = None
        self._lookups: dict[int, tuple] = {}  # id(ids) -> (ids, result): the overlap and JS share

    @classmethod
    def from_logits(cls, z: torch.Tensor, k: int) -> TopkChunk:
        """The top-k view of full logits z (B, V): ranked by the stable descending sort of
        z in its own dtype (ties to the lower id), log-probs from its float64 log_softmax."""
        order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
        log_p = torch.log_softmax(z.double(), dim=1).gather(1, order)
        return cls(order, log_p, z.shape[1], resolution(torch.float64))

    @classmethod
    def from_topk(cls, ids: torch.Tensor, logprobs: torch.Tensor, vocab: int, k: int):
        """ids (B, k_in) int64, logprobs (B, k_in) as stored (any order); k <= k_in is the
        view's k. The chunk's `problems` are (B,) masks of the rows with each of PROBLEMS;
        out-of-range ids are clamped so that the pass can run on to report them."""
        by_id, perm = torch.sort(ids, dim=1)
        lp = logprobs.double().gather(1, perm)
        # The mass may exceed 1 by the rounding of the stored log-probabilities: at most eps
        # relative on each, i.e. eps * (1 + entropy) <= eps * (1 + log V) on their sum.
        tol = 4.0 * resolution(logprobs.dtype) * (1.0 + math.log(vocab))
        problems = {
            "ids": (by_id[:, 0] < 0) | (by_id[:, -1] >= vocab),
            "repeated": (by_id[:, 1:] == by_id[:, :-1]).any(dim=1),
            "non_finite": ~torch.isfinite(lp).all(dim=1),
            "mass": torch.logsumexp(lp, dim=1) > tol,
        }
        by_id = by_id.clamp(0, vocab - 1)
        # by id first, then a stable sort by log-prob: equal log-probs keep the lower id first
        rank = torch.sort(lp, dim=1, descending=True, stable=True).indices[:, :k]
        sorted_view = (by_id, lp) if k == ids.shape[1] else (None, None)
        chunk = cls(by_id.gather(1, rank), lp.gather(1, rank), vocab,
                    resolution(logprobs.dtype), *sorted_view)  # fmt: skip
        chunk.problems = problems
        return chunk

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(ids), found): (B, m) float64 log-probs of the classes ids (B, m), the tail
        estimate where a class is outside this top-k, and whether it is inside."""
        seen = self._lookups.get(id(ids))
        if seen is not None and seen[0] is ids:
            return seen[1]
        pos = torch.searchsorted(self.by_id, ids.contiguous()).clamp_max(self.k - 1)
        found = self.by_id.gather(1, pos) == ids
        result = torch.where(found, self.log_p_by_id.gather(1, pos), self.log_fill[:, None]), found
        self._lookups[id(ids)] = (ids, result)
        return result

    def aligned(self, other: TopkChunk):
        """(log p, log q, p, q): (B, 2k + 1) float64, this model's and the other's mass on
        this top-k, on the other's top-k classes outside this one (-inf, i.e. empty, where
        inside), and on the tail bin of the classes outside both."""
        q_here, _ = other.lookup(self.order)
        _, inside = self.lookup(other.order)
        empty = torch.full_like(other.log_p, -math.inf)
        p_there = torch.where(inside, empty, self.log_fill[:, None])
        q_there = torch.where(inside, empty, other.log_p)
        union = self.k + (~inside).sum(dim=1)  # (B,) |U|
        log_rest = torch.log((self.vocab - union).double())  # -inf when U is every class
        log_p = torch.cat([self.log_p, p_there, (self.log_fill + log_rest)[:, None]], dim=1)
        log_q = torch.cat([q_here, q_there, (other.log_fill + log_rest)[:, None]], dim=1)
        return log_p, log_q, log_p.exp(), log_q.exp()

    def nll(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -log p(y) (the tail estimate, floored, where y is outside) and (B,) outside."""
        if self._nll is not None and self._nll[0] is y:  # the loss and the count both ask
            return self._nll[1]
        self._nll = (y, self._compute_nll(y))
        return self._nll[1]

    def _compute_nll(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p, found = self.lookup(y[:, None])
        outside = self.vocab - self.k
        if outside:
            estimate = torch.log(self.tail.clamp_min(self.floor)) - math.log(outside)
            log_p = torch.where(found, log_p, estimate[:, None])
        return -log_p[:, 0], ~found[:, 0]

    def dense_probs(self) -> torch.Tensor:
        """(B, V) float64: the top-k probabilities, the tail estimate elsewhere."""
        fill = self.log_fill.exp()[:, None].repeat(1, self.vocab)
        return fill.scatter_(1, self.order, self.log_p.exp())
