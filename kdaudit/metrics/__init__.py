"""The metric registry (PROTOCOL section 4): each metric's name, better direction, whether
it is one of the functional metrics of the transfer verdict, the streamed accumulator whose
totals it is computed from, and that last division (`finalise`).

This module imports neither torch nor numpy: stats and the report read the registry on
stored tables. The streamed computation (kdaudit.metrics.streaming, torch) runs every
accumulator that a registered metric names and finalises each metric from the totals, so a
new metric is one `METRICS.add(Metric(...))` (and, if no accumulator yet sums what it
needs, one accumulator registered in kdaudit.metrics.streaming.ACCUMULATORS).

Top-k inputs (a model known only by its k most probable classes and their log-probabilities,
kdaudit.metrics.topk) determine some metrics exactly and others only approximately; each
entry says which (`topk`, one of TOPK_KINDS), so that every table can mark the approximate
ones "top-k approx." (`topk_approximate`). `topk_only` metrics exist for top-k inputs alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kdaudit.registry import Registry

# Totals of one model's accumulators (python floats; counts exact below 2**53), the number
# of examples n and the length k of the compared rankings (K classes; k for a top-k view)
# -> the metric's value.
Finalise = Callable[[dict[str, float], int, int], float]
DIRECTIONS = ("lower", "higher")
# What top-k inputs give (k < V):
# exact      determined exactly by the top-k (top-1 labels and counts);
# over_topk  defined over the top-k ranks or sets (equal to the full metric when k = V);
# label      exact where the label is inside the model's top-k, else estimated from the tail;
# approx     the union of both models' top-k plus one tail bin: "top-k approx.".
TOPK_KINDS = ("exact", "over_topk", "label", "approx")
TOPK_MARK = "top-k approx."


@dataclass(frozen=True)
class Metric:
    name: str
    better: str | None  # lower | higher; None: a count that describes the data, never tested
    accumulator: str  # the kdaudit.metrics.streaming.ACCUMULATORS entry it is finalised from
    finalise: Finalise
    functional: bool = False  # one of the functional metrics the verdict counts
    description: str = ""
    topk: str = "exact"  # what top-k inputs give: one of TOPK_KINDS
    topk_only: bool = False  # computed for top-k inputs only (absent for full logits)

    def __post_init__(self) -> None:
        if self.better is not None and self.better not in DIRECTIONS:
            raise ValueError(f"metric {self.name}: better must be one of {DIRECTIONS}")
        if self.topk not in TOPK_KINDS:
            raise ValueError(f"metric {self.name}: topk must be one of {TOPK_KINDS}")


METRICS: Registry[Metric] = Registry("metric")


def better_directions() -> dict[str, str]:
    """Metric -> its better direction, for every tested metric, in registration order."""
    return {m.name: m.better for m in METRICS.entries() if m.better is not None}


def functional_metrics() -> tuple[str, ...]:
    """The functional metrics of the transfer verdict, in registration order."""
    return tuple(m.name for m in METRICS.entries() if m.functional)


def topk_approximate(results, k: int | None, vocab_size: int) -> tuple[str, ...]:
    """The metrics to mark TOPK_MARK for models compared through a top-k view.

    `results`: each model's metrics (dicts as functional_similarity returns); k: the view's k
    (None: full logits, nothing approximate). With k = V nothing is approximate. The
    `label` metrics (loss) are marked when some model's label fell outside its top-k.
    """
    if k is None or k >= vocab_size:
        return ()
    outside = any(r.get("n_label_outside_topk", 0) for r in results)
    kinds = ("approx", "label") if outside else ("approx",)
    return tuple(m.name for m in METRICS.entries() if m.topk in kinds)


def _ratio(count: float, total: float) -> float:
    """Agreement over a subset; nan for an empty subset, where no rate exists."""
    return int(count) / int(total) if total else math.nan


def _disagreement(t: dict, n: int) -> float:
    return (n - int(t["agree"])) / n


def _add(name, better, accumulator, finalise, functional=False, description="", **topk) -> None:
    METRICS.add(Metric(name, better, accumulator, finalise, functional, description, **topk))


# Registration order is the order of the tables: the functional metrics first.
_add("activation_distance", "lower", "distributions", lambda t, n, k: t["activation_sum"] / n,
     True, "mean L2 norm of softmax_t - softmax_c", topk="approx")  # fmt: skip
_add("rank_disagreement", "lower", "labelings", lambda t, n, k: int(t["rank_diff"]) / (n * k),
     True, "share of (example, rank) pairs whose classes differ", topk="over_topk")  # fmt: skip
_add("prediction_disagreement", "lower", "labelings", lambda t, n, k: _disagreement(t, n),
     True, "share of examples whose top-1 classes differ")  # fmt: skip
_add("js_divergence", "lower", "distributions", lambda t, n, k: t["js_sum"] / n,
     True, "mean Jensen-Shannon divergence, nats", topk="approx")  # fmt: skip
_add("prediction_agreement", "higher", "labelings", lambda t, n, k: 1.0 - _disagreement(t, n))
_add("correct_agreement", "higher", "labelings",
     lambda t, n, k: _ratio(t["agree_teacher_correct"], t["teacher_correct"]),
     description="top-1 agreement over the examples the teacher gets right")  # fmt: skip
_add("incorrect_agreement", "higher", "labelings",
     lambda t, n, k: _ratio(int(t["agree"]) - int(t["agree_teacher_correct"]),
                            n - int(t["teacher_correct"])),
     description="top-1 agreement over the examples the teacher gets wrong")  # fmt: skip
_add("n_teacher_correct", None, "labelings", lambda t, n, k: int(t["teacher_correct"]))
_add("n_teacher_incorrect", None, "labelings", lambda t, n, k: n - int(t["teacher_correct"]))
_add("variation_of_information", "lower", "labelings", lambda t, n, k: t["vi"],
     description="between the two top-1 labelings, nats")  # fmt: skip
_add("procrustes_distance", "lower", "procrustes", lambda t, n, k: t["procrustes"],
     description="orthogonal Procrustes distance of the centred, unit-norm softmax matrices",
     topk="approx")  # fmt: skip
_add("accuracy", "higher", "labelings", lambda t, n, k: int(t["model_correct"]) / n,
     description="the compared model's own test accuracy")  # fmt: skip
_add("loss", "lower", "distributions", lambda t, n, k: t["nll_sum"] / n,
     description="the compared model's own test cross-entropy, nats", topk="label")  # fmt: skip
_add("topk_overlap", "higher", "topk_sets", lambda t, n, k: int(t["overlap"]) / (n * k),
     description="share of the teacher's top-k classes in the model's top-k",
     topk="over_topk", topk_only=True)  # fmt: skip
_add("n_label_outside_topk", None, "topk_sets", lambda t, n, k: int(t["label_outside"]),
     description="positions whose label is outside the model's top-k (loss estimated there)",
     topk_only=True)  # fmt: skip

# The streamed computation and its constants, loaded (with torch) on first use.
_STREAMING = ("functional_similarity", "functional_similarity_many", "accuracy_and_loss",
              "top1_predictions",
              "NonFiniteLogits", "InvalidTopK", "BadRows", "RowSource", "TopK", "DEFAULT_CHUNK_SIZE", "PROCRUSTES_MAX_CLASSES",
              "ACCUMULATORS")  # fmt: skip


def __getattr__(name: str):
    if name in _STREAMING:
        from kdaudit.metrics import streaming

        return getattr(streaming, name)
    # snapshots of the registry, under the names older code used
    if name == "BETTER":
        return better_directions()
    if name == "FUNCTIONAL_METRICS":
        return functional_metrics()
    raise AttributeError(f"module 'kdaudit.metrics' has no attribute {name!r}")
