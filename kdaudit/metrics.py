"""Functional similarity between a teacher and a compared model (PROTOCOL section 4).

Everything is computed from logits converted chunk by chunk to float64 and accumulated in
float64 (sums) or int64 (counts), so that test sets with many examples (or language-model
token positions) never have to fit in memory at once. Memory is O(chunk_size * K + K^2):
the K x K Procrustes cross-moment (float64) and top-1 contingency table (int64) make very
large vocabularies costly (K = 50,000 would need about 40 GB for the two).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

BETTER: dict[str, str] = {
    "activation_distance": "lower",
    "js_divergence": "lower",
    "rank_disagreement": "lower",
    "prediction_disagreement": "lower",
    "prediction_agreement": "higher",
    "correct_agreement": "higher",
    "incorrect_agreement": "higher",
    "variation_of_information": "lower",
    "procrustes_distance": "lower",
    "accuracy": "higher",
    "loss": "lower",
}

FUNCTIONAL_METRICS = (
    "activation_distance",
    "rank_disagreement",
    "prediction_disagreement",
    "js_divergence",
)

# Rows per chunk. On a 2-core CPU with K = 65 (benchmarks/metrics_bench.py), 1024 to 4096
# rows were equally fast and larger chunks were no faster but needed more memory. Each
# chunk is also capped at _MAX_CHUNK_ELEMENTS so that a large vocabulary keeps each of the
# dozen (B, K) float64 temporaries at about 32 MiB.
DEFAULT_CHUNK_SIZE = 4096
_MAX_CHUNK_ELEMENTS = 1 << 22

# A centred softmax matrix whose squared Frobenius norm is below this per row is treated as
# constant: float64 rounding of identical rows leaves ~1e-32 per row, while any model whose
# fp32 logits actually vary across examples leaves many orders of magnitude more.
_CONSTANT_SS_PER_ROW = 1e-24

Array = torch.Tensor | np.ndarray


def functional_similarity(
    teacher_logits: Array,
    model_logits: Array,
    labels: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float | int]:
    """Compare a model's outputs with the teacher's on the same examples.

    Logits are (N, K) or (..., K) with labels (N,) or (...); leading dimensions are flattened
    so that every position (e.g. every next-token position) is one example. Inputs may be
    torch tensors (computed on the teacher's device) or numpy arrays, including np.memmap,
    which are read `chunk_size` rows at a time. Returns python floats, and ints for the two
    subset sizes; an agreement over an empty subset and the Procrustes distance of a constant
    output matrix are nan.
    """
    teacher, model, flat_labels, lead_shape = _validated(teacher_logits, model_logits, labels)
    n, k = teacher.shape
    device = _compute_device(teacher, model)
    rows = _chunk_rows(chunk_size, k)
    acc = _Accumulators(k, device)
    with torch.no_grad():
        for offset, (t, c, y) in _chunks(teacher, model, flat_labels, rows, device):
            acc.update(t, c, y, offset)
        # Checked before finalising: an SVD of non-finite sums fails with a less useful error.
        _raise_if_non_finite(_to_host(acc.finite.totals()), lead_shape)
        totals = _to_host(acc.totals())
    return _metrics_from_totals(totals, n, k)


def accuracy_and_loss(
    logits: Array, labels: Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[float, float]:
    """One model's top-1 accuracy and mean cross-entropy (nats), streamed like the above."""
    logits, _, flat_labels, lead_shape = _validated(logits, logits, labels)
    n, k = logits.shape
    device = _compute_device(logits, logits)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, n, _chunk_rows(chunk_size, k)):
            part = slice(start, start + _chunk_rows(chunk_size, k))
            z = _to_device(logits[part], device).double()  # (B, K)
            y = _to_device(flat_labels[part], device).long()  # (B,)
            if not torch.isfinite(z).all():
                raise ValueError(
                    f"logits contain NaN or inf (in rows {start}..{start + len(y) - 1})"
                )
            correct += (z.argmax(dim=1) == y).sum()  # ties: the first maximum, as the sort
            nll += torch.nn.functional.cross_entropy(z, y, reduction="sum")
    return float(correct) / n, float(nll) / n


# ---------------------------------------------------------------- validation and chunking


def _validated(teacher, model, labels) -> tuple[Array, Array, Array, tuple[int, ...]]:
    """Check the inputs and return (N, K) logits views, (N,) labels and the leading shape."""
    teacher, model, labels = (_as_array(x) for x in (teacher, model, labels))
    _check_logit_shapes(tuple(teacher.shape), tuple(model.shape))
    k = int(teacher.shape[-1])
    lead_shape = tuple(int(d) for d in teacher.shape[:-1])
    _check_labels(labels, lead_shape, k)
    return teacher.reshape(-1, k), model.reshape(-1, k), labels.reshape(-1), lead_shape


def _as_array(x) -> Array:
    if isinstance(x, torch.Tensor):
        return x.detach()
    # np.memmap is an ndarray subclass and passes through untouched (no read).
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _check_logit_shapes(t_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> None:
    if t_shape != c_shape:
        raise ValueError(
            f"shape mismatch: teacher_logits has shape {t_shape} but model_logits has shape "
            f"{c_shape}; pass logits of the same (..., K) shape for the same examples"
        )
    if len(t_shape) < 2:
        raise ValueError(
            f"logits have shape {t_shape}; pass logits of shape (N, K) or (..., K) with a "
            "class dimension last"
        )
    if t_shape[-1] < 2:
        raise ValueError(
            f"logits have K={t_shape[-1]} classes (last dimension); need K >= 2 classes"
        )
    if math.prod(t_shape[:-1]) == 0:
        raise ValueError(f"logits have shape {t_shape}: N == 0 examples; pass at least one")


def _check_labels(labels: Array, lead_shape: tuple[int, ...], k: int) -> None:
    if tuple(labels.shape) != lead_shape:
        raise ValueError(
            f"labels length/shape mismatch: labels have shape {tuple(labels.shape)} but the "
            f"logits need {lead_shape} (one label per row of logits)"
        )
    if not _is_integer(labels):
        raise ValueError(f"labels have dtype {labels.dtype}; pass integer class indices")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise ValueError(
            f"labels out of range: found label {bad}, labels must lie in [0, K) = [0, {k}); "
            "pass class indices that match the logits' last dimension"
        )


def _is_integer(x: Array) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return x.dtype.kind in "iu"


def _compute_device(teacher: Array, model: Array) -> torch.device:
    """The teacher's accelerator if it has one, else the model's, else the CPU."""
    for x in (teacher, model):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


def _chunk_rows(chunk_size: int, k: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; pass a positive number of rows")
    return max(1, min(chunk_size, _MAX_CHUNK_ELEMENTS // k))


def _chunks(
    teacher: Array, model: Array, labels: Array, rows: int, device: torch.device
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Yield (first row index, (teacher, model, labels) chunk on `device`) in input dtypes."""
    for start in range(0, labels.shape[0], rows):
        part = slice(start, start + rows)
        yield (
            start,
            (
                _to_device(teacher[part], device),
                _to_device(model[part], device),
                _to_device(labels[part], device).long(),
            ),
        )


def _to_device(x: Array, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    # np.array copies just this chunk (memmaps are read-only; torch wants writable memory).
    return torch.from_numpy(np.array(x)).to(device)


# ---------------------------------------------------------------- accumulators


class _Accumulators:
    """All running sums and counts; `totals()` returns 0-d tensors still on the device."""

    def __init__(self, k: int, device: torch.device):
        self.distributions = _DistributionSums(device)
        self.labelings = _LabelingCounts(k, device)
        self.procrustes = _ProcrustesMoments(k, device)
        self.finite = _FiniteCheck(device)

    def update(self, t: torch.Tensor, c: torch.Tensor, y: torch.Tensor, offset: int) -> None:
        """t, c: (B, K) logits in their input dtype; y: (B,) int64 labels."""
        self.finite.update(t, c, offset)
        log_p_t = torch.log_softmax(t.double(), dim=1)  # (B, K) float64
        log_p_c = torch.log_softmax(c.double(), dim=1)
        p_t, p_c = log_p_t.exp(), log_p_c.exp()
        self.distributions.update(log_p_t, log_p_c, p_t, p_c, y)
        self.procrustes.update(p_t, p_c)
        # Sorting the input dtype gives the same order as float64 (the cast is exact).
        self.labelings.update(_ranking(t), _ranking(c), y)

    def totals(self) -> dict[str, torch.Tensor]:
        return {
            **self.distributions.totals(),
            **self.labelings.totals(),
            **self.procrustes.totals(),
        }


def _ranking(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) int64 classes by descending logit; a stable sort breaks ties to lower index."""
    return torch.sort(logits, dim=1, descending=True, stable=True).indices


class _DistributionSums:
    """Sums over examples of activation distance, JS divergence and cross-entropy (nats)."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.activation, self.js, self.nll = zero.clone(), zero.clone(), zero.clone()

    def update(self, log_p_t, log_p_c, p_t, p_c, y: torch.Tensor) -> None:
        """log_p_*, p_*: (B, K) float64 log-softmax and softmax; y: (B,) labels."""
        self.activation += (p_t - p_c).norm(dim=1).sum()
        self.js += _js_divergence(log_p_t, log_p_c, p_t, p_c).sum()
        self.nll -= log_p_c.gather(1, y[:, None]).sum()

    def totals(self) -> dict[str, torch.Tensor]:
        return {"activation_sum": self.activation, "js_sum": self.js, "nll_sum": self.nll}


def _js_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """(B,) JS divergence in nats of two (B, K) float64 rows, from log-probs and probs.

    With m = (p + q) / 2 and gap = log q - log p, log(p / m) = ln 2 - log(1 + e^gap) and
    log(q / m) = ln 2 - log(1 + e^-gap); both share log1p(e^-|gap|), so each is formed
    without subtracting two large logs, and identical rows give exactly 0.
    """
    gap = log_q - log_p  # (B, K)
    shared = torch.log1p(torch.exp(-gap.abs()))
    log_p_over_m = math.log(2.0) - shared - gap.clamp_min(0.0)
    log_q_over_m = math.log(2.0) - shared + gap.clamp_max(0.0)
    js = 0.5 * (_xlog(p, log_p_over_m) + _xlog(q, log_q_over_m)).sum(dim=1)
    # JS lies in [0, ln 2]; summing terms of both signs can miss that by a few ulps.
    return js.clamp(0.0, math.log(2.0))


def _xlog(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio, with p == 0 contributing exactly 0 even if log_ratio is infinite."""
    return torch.where(p > 0, p * log_ratio, 0.0)


class _LabelingCounts:
    """int64 counts over rankings and top-1 labels, plus the K x K top-1 contingency table."""

    def __init__(self, k: int, device: torch.device):
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.k = k
        self.rank_diff, self.agree, self.model_correct = zero.clone(), zero.clone(), zero.clone()
        self.teacher_correct, self.agree_teacher_correct = zero.clone(), zero.clone()
        self.table = torch.zeros(k * k, dtype=torch.int64, device=device)  # (K*K,) t*K + c

    def update(self, order_t: torch.Tensor, order_c: torch.Tensor, y: torch.Tensor) -> None:
        """order_t, order_c: (B, K) classes by rank; y: (B,) labels."""
        top_t, top_c = order_t[:, 0], order_c[:, 0]
        agree, teacher_right = top_t == top_c, top_t == y
        self.rank_diff += (order_t != order_c).sum()
        self.agree += agree.sum()
        self.teacher_correct += teacher_right.sum()
        self.agree_teacher_correct += (agree & teacher_right).sum()
        self.model_correct += (top_c == y).sum()
        self.table += torch.bincount(top_t * self.k + top_c, minlength=self.k * self.k)

    def totals(self) -> dict[str, torch.Tensor]:
        return {
            "rank_diff": self.rank_diff,
            "agree": self.agree,
            "teacher_correct": self.teacher_correct,
            "agree_teacher_correct": self.agree_teacher_correct,
            "model_correct": self.model_correct,
            "vi": _variation_of_information(self.table.view(self.k, self.k)),
        }


def _variation_of_information(table: torch.Tensor) -> torch.Tensor:
    """VI = 2 H(X,Y) - H(X) - H(Y) in nats from a (K, K) int64 contingency table."""
    h_xy = _entropy_of_counts(table.flatten())
    h_x, h_y = _entropy_of_counts(table.sum(dim=1)), _entropy_of_counts(table.sum(dim=0))
    # VI >= 0 exactly; the three entropies are each rounded, so identical labelings can
    # land a few ulps below zero.
    return (2.0 * h_xy - h_x - h_y).clamp_min(0.0)


def _entropy_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the frequencies counts / n, as log n - sum c log c / n."""
    counts = counts.double()
    n = counts.sum()
    return torch.log(n) - torch.xlogy(counts, counts).sum() / n


class _ProcrustesMoments:
    """Column means and centred (co)moments of the two (N, K) softmax matrices.

    Merged chunk by chunk with the pairwise update of Chan et al., which centres each chunk
    on its own mean; subtracting N * mean mean^T from raw sums instead would cancel away
    most of the digits when the outputs vary little around their mean.
    """

    def __init__(self, k: int, device: torch.device):
        self.n = 0
        self.mean_t = torch.zeros(k, dtype=torch.float64, device=device)  # (K,)
        self.mean_c = torch.zeros(k, dtype=torch.float64, device=device)
        self.cross = torch.zeros(k, k, dtype=torch.float64, device=device)  # A_c^T B_c
        self.ss_t = torch.zeros((), dtype=torch.float64, device=device)  # ||A_c||_F^2
        self.ss_c = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, p_t: torch.Tensor, p_c: torch.Tensor) -> None:
        """p_t, p_c: (B, K) float64 softmax rows."""
        b = p_t.shape[0]
        chunk_mean_t, chunk_mean_c = p_t.mean(dim=0), p_c.mean(dim=0)
        d_t, d_c = p_t - chunk_mean_t, p_c - chunk_mean_c  # (B, K) centred on the chunk
        delta_t, delta_c = chunk_mean_t - self.mean_t, chunk_mean_c - self.mean_c
        weight = self.n * b / (self.n + b)
        self.cross += d_t.T @ d_c + weight * torch.outer(delta_t, delta_c)
        self.ss_t += d_t.square().sum() + weight * delta_t.square().sum()
        self.ss_c += d_c.square().sum() + weight * delta_c.square().sum()
        self.mean_t += delta_t * (b / (self.n + b))
        self.mean_c += delta_c * (b / (self.n + b))
        self.n += b

    def totals(self) -> dict[str, torch.Tensor]:
        return {"procrustes": self.distance()}

    def distance(self) -> torch.Tensor:
        """min_R ||A - B R||_F^2 = 2 - 2 ||A^T B||_* for centred, unit-norm A and B.

        nan when either matrix is constant (zero norm after centring): it cannot be scaled
        to unit norm, and no distance to it is meaningful.
        """
        nuclear = torch.linalg.svdvals(self.cross).sum()
        d = (2.0 - 2.0 * nuclear / torch.sqrt(self.ss_t * self.ss_c)).clamp_min(0.0)
        tol = _CONSTANT_SS_PER_ROW * self.n
        constant = (self.ss_t <= tol) | (self.ss_c <= tol)
        return torch.where(constant, torch.full_like(d, math.nan), d)


class _FiniteCheck:
    """First flattened row index holding a nan or inf, per input (-1 if none)."""

    def __init__(self, device: torch.device):
        self.first_bad_t = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_c = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, t: torch.Tensor, c: torch.Tensor, offset: int) -> None:
        self.first_bad_t = _first_bad_row(t, offset, self.first_bad_t)
        self.first_bad_c = _first_bad_row(c, offset, self.first_bad_c)

    def totals(self) -> dict[str, torch.Tensor]:
        return {"first_bad_teacher": self.first_bad_t, "first_bad_model": self.first_bad_c}


def _first_bad_row(x: torch.Tensor, offset: int, so_far: torch.Tensor) -> torch.Tensor:
    """Keeps the check on the device: no host sync inside the chunk loop."""
    bad = ~torch.isfinite(x).all(dim=1)  # (B,)
    first_here = torch.where(bad.any(), offset + bad.int().argmax(), -1)
    return torch.where(so_far >= 0, so_far, first_here)


# ---------------------------------------------------------------- finalising


def _to_host(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device sync per call; int64 counts stay exact in float64 below 2**53."""
    values = torch.stack([v.double() for v in totals.values()]).cpu().tolist()
    return dict(zip(totals, values, strict=True))


def _raise_if_non_finite(totals: dict[str, float], lead_shape: tuple[int, ...]) -> None:
    for name, key in (("teacher_logits", "first_bad_teacher"), ("model_logits", "first_bad_model")):
        row = int(totals[key])
        if row >= 0:
            where = tuple(int(i) for i in np.unravel_index(row, lead_shape))
            raise ValueError(
                f"non-finite values (nan or inf) in {name}: first bad row is {row} of the "
                f"flattened logits (index {where} of the leading dimensions); remove or fix "
                "those rows before comparing"
            )


def _metrics_from_totals(totals: dict[str, float], n: int, k: int) -> dict[str, float | int]:
    """Turn the summed counts into the metrics dict (all divisions happen here)."""
    n_correct = int(totals["teacher_correct"])
    n_incorrect = n - n_correct
    agree_correct = int(totals["agree_teacher_correct"])
    agree_incorrect = int(totals["agree"]) - agree_correct
    disagreement = (n - int(totals["agree"])) / n
    return {
        "activation_distance": totals["activation_sum"] / n,
        "js_divergence": totals["js_sum"] / n,
        "rank_disagreement": int(totals["rank_diff"]) / (n * k),
        "prediction_disagreement": disagreement,
        "prediction_agreement": 1.0 - disagreement,
        "correct_agreement": _ratio(agree_correct, n_correct),
        "incorrect_agreement": _ratio(agree_incorrect, n_incorrect),
        "n_teacher_correct": n_correct,
        "n_teacher_incorrect": n_incorrect,
        "variation_of_information": totals["vi"],
        "procrustes_distance": totals["procrustes"],
        "accuracy": int(totals["model_correct"]) / n,
        "loss": totals["nll_sum"] / n,
    }


def _ratio(count: int, total: int) -> float:
    """Agreement over a subset; nan for an empty subset, where no rate exists."""
    return count / total if total else math.nan
