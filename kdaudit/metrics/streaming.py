"""Functional similarity between a teacher and a compared model (PROTOCOL section 4),
streamed: every metric registered in kdaudit.metrics is finalised from the totals of the
accumulator it names (ACCUMULATORS below).

Everything is computed from logits converted chunk by chunk to float64 and accumulated in
float64 (sums) or int64 (counts), so that test sets with many examples (or language-model
token positions) never have to fit in memory at once. Logits may also be a `RowSource`,
read lazily a chunk at a time (kdaudit.compare streams files through it), and
`functional_similarity_many` compares several models with one teacher in a single pass.

Memory is O(chunk_size * K) for the chunk temporaries, O(K) for the top-1 marginals, and
O(P) for the variation of information, P <= min(N, K^2) being the number of distinct
(teacher top-1, model top-1) pairs that occur. The one K x K cost is the Procrustes
cross-moment, kept only for K <= `procrustes_max_classes` (see `functional_similarity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from kdaudit.metrics import METRICS
from kdaudit.metrics.topk import PROBLEMS, TopK, TopkChunk

# Rows per chunk. On a 2-core CPU with K = 65 (benchmarks/metrics_bench.py), 1024 to 4096
# rows were equally fast and larger chunks were no faster but needed more memory. Each
# chunk is also capped at _MAX_CHUNK_ELEMENTS so that a large vocabulary keeps each of the
# dozen (B, K) float64 temporaries at about 8 MiB (B = 32 rows at K = 32,000): at 32 MiB
# they added ~700 MB to the peak of benchmarks/compare_bench.py, and a row of 32,000 is
# already long enough for every operation to run at full speed.
DEFAULT_CHUNK_SIZE = 4096
_MAX_CHUNK_ELEMENTS = 1 << 20

# A centred softmax matrix whose squared Frobenius norm is below this per row is treated as
# constant: float64 rounding of identical rows leaves ~1e-32 per row, while any model whose
# fp32 logits actually vary across examples leaves many orders of magnitude more.
_CONSTANT_SS_PER_ROW = 1e-24

# The largest K for which the Procrustes distance is computed by default: its K x K float64
# cross-moment is 32 MiB and its SVD takes about 1.5 s on a 2-core CPU at K = 2048, while at
# K = 4096 the SVD already took 78 s on the same machine (and K = 32,000 would need 8.2 GB).
PROCRUSTES_MAX_CLASSES = 2048


@runtime_checkable
class RowSource(Protocol):
    """Logits read lazily, a block of rows at a time (e.g. from a file on disk).

    `shape` is the full (..., K) shape; `read(start, stop)` returns rows [start, stop) of the
    (prod(shape[:-1]), K) row-major flattening as a tensor or ndarray (a copy it owns).
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, start: int, stop: int) -> torch.Tensor | np.ndarray: ...


Array = torch.Tensor | np.ndarray
Logits = torch.Tensor | np.ndarray | RowSource | TopK


def functional_similarity(
    teacher_logits: Logits,
    model_logits: Logits,
    labels: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    procrustes_max_classes: int | None = PROCRUSTES_MAX_CLASSES,
    topk: int | None = None,
) -> dict[str, float | int]:
    """Compare a model's outputs with the teacher's on the same examples.

    Logits are (N, K) or (..., K) with labels (N,) or (...); leading dimensions are flattened
    so that every position (e.g. every next-token position) is one example. Inputs may be
    torch tensors (computed on the teacher's device), numpy arrays, including np.memmap,
    or `RowSource`s, all read `chunk_size` rows at a time, or `TopK` log-probabilities.
    Returns python floats, and ints for the counts; an agreement over an empty subset and
    the Procrustes distance of a constant output matrix are nan. Raises ValueError for bad
    inputs, NonFiniteLogits for a nan or inf in the logits, InvalidTopK for a bad top-k row.

    Top-k: when either input is a `TopK` (or `topk` is given), both are compared through
    their top-k view, k = `topk` or else the smallest k of the TopK inputs (at most each
    TopK's k); full logits are cut to their top k. kdaudit.metrics.topk defines each metric
    there; the registry says which are exact (`Metric.topk`), and `topk_overlap` and
    `n_label_outside_topk` are returned only then.

    The Procrustes distance is nan when K > `procrustes_max_classes` (None: no limit). It is
    2 - 2 ||A_c^T B_c||_* for the centred, unit-norm (N, K) softmax matrices, and the nuclear
    norm needs all singular values of that K x K matrix (or, equally, of an N x N Gram
    product): exact memory is min(N, K)^2 floats and its SVD costs O(min(N, K)^3), which for
    a language model's vocabulary (K = 32,000: 8.2 GB, hours of CPU) and token count is out
    of budget. We know of no exact method in less memory (sketches only approximate the
    nuclear norm), so none is attempted. Every other metric is exact for any K.
    """
    return functional_similarity_many(
        teacher_logits,
        [model_logits],
        labels,
        chunk_size=chunk_size,
        procrustes_max_classes=procrustes_max_classes,
        topk=topk,
    )[0]


def functional_similarity_many(
    teacher_logits: Logits,
    models: Sequence[Logits],
    labels: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    procrustes_max_classes: int | None = PROCRUSTES_MAX_CLASSES,
    topk: int | None = None,
) -> list[dict[str, float | int]]:
    """`functional_similarity` of each model against one teacher, in a single pass.

    Each teacher chunk is read, normalised and sorted once for all the models (sorting
    dominates at a large K), and the results equal separate calls exactly. Memory adds, per
    model, its running sums: small, except the K x K Procrustes cross-moment (8 K^2 bytes)
    when K <= procrustes_max_classes.
    """
    if len(models) == 0:
        raise ValueError("models is empty; pass at least one model's logits")
    names = ["teacher_logits"] + (
        ["model_logits"] if len(models) == 1 else [f"model_logits[{i}]" for i in range(len(models))]
    )
    inputs, flat_labels, lead_shape, k = _validated([teacher_logits, *models], names, labels)
    view = _view(inputs, topk)
    n = flat_labels.shape[0]
    device = _compute_device(*(a for x in inputs for a in x.data))
    rows = _chunk_rows(chunk_size, max(x.width for x in inputs))
    with_procrustes = procrustes_max_classes is None or k <= procrustes_max_classes
    sources = [x.source(device) for x in inputs]
    accs = [_Accumulators(k, device, with_procrustes, view is not None) for _ in models]
    with _streaming(device):
        for start in range(0, n, rows):
            y = _to_device(flat_labels[start : start + rows], device).long()  # (B,)
            shared = sources[0].chunk(start, start + rows, view)
            for source, acc in zip(sources[1:], accs, strict=True):
                acc.update(shared, source.chunk(start, start + rows, view), y)
        # Checked before finalising: an SVD of non-finite sums fails with a less useful error.
        for i, source in enumerate(sources):
            source.raise_if_bad(None if i == 0 else i - 1, lead_shape)
        ranks = k if view is None else view
        return [_finalised(_to_host(acc.totals()), n, ranks, view is not None) for acc in accs]


_NON_FINITE = "non-finite values (nan or inf) in "


class BadRows(ValueError):
    """A row of an input that cannot be compared; `model` is None for the teacher, else the
    model's index, and `row` the first bad row of the flattened input."""

    def __init__(self, message: str, model: int | None, row: int):
        super().__init__(message)
        self.model, self.row = model, row


class NonFiniteLogits(BadRows):
    """A nan or inf in the logits."""


class InvalidTopK(BadRows):
    """A top-k row whose ids or log-probabilities break the TopK contract; `problem` is
    its key in kdaudit.metrics.topk.PROBLEMS."""

    def __init__(self, message: str, model: int | None, row: int, problem: str):
        super().__init__(message, model, row)
        self.problem = problem


def accuracy_and_loss(
    logits: Logits, labels: Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[float, float]:
    """One model's top-1 accuracy and mean cross-entropy (nats), streamed like the above.

    For `TopK` log-probabilities the loss is exact where the label is in the top-k and the
    tail estimate elsewhere (kdaudit.metrics.topk), from all of the input's k classes."""
    (model,), flat_labels, lead_shape, _ = _validated([logits], ["logits"], labels)
    n = flat_labels.shape[0]
    device = _compute_device(*model.data)
    rows = _chunk_rows(chunk_size, model.width)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    source = model.source(device)
    with _streaming(device):
        for start in range(0, n, rows):
            y = _to_device(flat_labels[start : start + rows], device).long()  # (B,)
            top1, nll_sum = source.top1_and_nll(start, start + rows, y)
            correct += (top1 == y).sum()
            nll += nll_sum
        source.raise_if_bad(None, lead_shape)
    return int(correct) / n, float(nll) / n


def top1_predictions(
    logits: Logits, labels: Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> np.ndarray:
    """(N,) int64: each row's top-1 class, flattened, the first maximum as every metric takes
    it; streamed like accuracy_and_loss, whose checks `labels` go through."""
    (model,), flat_labels, lead_shape, _ = _validated([logits], ["logits"], labels)
    n = flat_labels.shape[0]
    rows = _chunk_rows(chunk_size, model.width)
    out = np.empty(n, dtype=np.int64)
    device = torch.device("cpu")
    source = model.source(device)
    with _streaming(device):
        for start in range(0, n, rows):
            y = _to_device(flat_labels[start : start + rows], torch.device("cpu")).long()
            top1, _ = source.top1_and_nll(start, start + rows, y)
            out[start : start + len(y)] = top1.cpu().numpy()
        source.raise_if_bad(None, lead_shape)
    return out


# ---------------------------------------------------------------- validation and chunking


def _validated(inputs, names, labels):
    """Check the inputs; returns (per input a _FullInput or _TopkInput, (N,) labels, the
    leading shape, the number of classes K)."""
    inputs = [_input(x, name) for x, name in zip(inputs, names, strict=True)]
    labels = _as_array(labels)
    first = inputs[0]
    for x in inputs:
        _check_logit_shapes(first, x)
    lead_shape = first.shape[:-1]
    _check_labels(labels, lead_shape, first.classes)
    return inputs, labels.reshape(-1), lead_shape, first.classes


def _view(inputs, topk: int | None) -> int | None:
    """The top-k view's k, or None to compare full logits."""
    ks = [x.k for x in inputs if isinstance(x, _TopkInput)]
    if topk is None:
        return min(ks) if ks else None
    if topk < 1 or topk > inputs[0].classes or any(topk > k for k in ks):
        most = min([inputs[0].classes, *ks])
        raise ValueError(f"topk={topk}; pass 1 <= topk <= {most} (the classes, and each "
                         "TopK input's k)")  # fmt: skip
    return topk


def _as_array(x) -> Array:
    if isinstance(x, torch.Tensor):
        return x.detach()
    # np.memmap is an ndarray subclass and passes through untouched (no read).
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _as_logits(x) -> Array | RowSource:
    if not isinstance(x, (torch.Tensor, np.ndarray)) and isinstance(x, RowSource):
        return x
    return _as_array(x)


def _flat(x: Array | RowSource, k: int) -> Array | _SourceRows:
    """An (N, K) view that slices rows, without reading anything yet."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.reshape(-1, k)
    return _SourceRows(x, k)


class _SourceRows:
    """Row slicing (`rows[a:b]`) of a RowSource's flattened (N, K) view."""

    def __init__(self, source: RowSource, k: int):
        self.source = source
        self.shape = (math.prod(source.shape[:-1]), k)

    def __getitem__(self, part: slice) -> torch.Tensor | np.ndarray:
        start, stop, _ = part.indices(self.shape[0])
        return self.source.read(start, stop)


def _input(x, name: str) -> _FullInput | _TopkInput:
    return _TopkInput(x, name) if isinstance(x, TopK) else _FullInput(_as_logits(x), name)


class _FullInput:
    """Full logits (..., K): `source()` reads them a chunk at a time in a comparison's view."""

    def __init__(self, logits: Array | RowSource, name: str):
        self.logits, self.name = logits, name
        self.shape = tuple(int(d) for d in logits.shape)
        self.classes = self.width = self.shape[-1] if self.shape else 0
        self.data = (logits,)

    def describe(self) -> str:
        return f"shape {self.shape}"

    def source(self, device: torch.device) -> _FullSource:
        return _FullSource(self, device)


class _FullSource:
    def __init__(self, x: _FullInput, device: torch.device):
        self.x, self.rows, self.device = x, _flat(x.logits, x.classes), device
        self.bad = _FirstBadRow(device)

    def chunk(self, start: int, stop: int, view: int | None):
        z = _to_device(self.rows[start:stop], self.device)  # (B, K) input dtype
        self.bad.update(~torch.isfinite(z).all(dim=1), start)
        return _Chunk(z) if view is None else TopkChunk.from_logits(z, view)

    def top1_and_nll(self, start: int, stop: int, y: torch.Tensor):
        """(B,) top-1 classes and the summed cross-entropy of rows [start, stop)."""
        z = _to_device(self.rows[start:stop], self.device).double()  # (B, K)
        self.bad.update(~torch.isfinite(z).all(dim=1), start)
        # argmax gives the first maximum, as the stable sort of the metrics does; no sort here
        return z.argmax(dim=1), torch.nn.functional.cross_entropy(z, y, reduction="sum")

    def raise_if_bad(self, model: int | None, lead_shape: tuple[int, ...]) -> None:
        _raise_if_bad(self.bad, _NON_FINITE + self.x.name, lead_shape, NonFiniteLogits, model)


class _TopkInput:
    """Top-k log-probabilities (TopK): ids and log-probs (..., k) of V classes."""

    def __init__(self, topk: TopK, name: str):
        self.name, self.k, self.classes = name, topk.k, int(topk.vocab_size)
        self.ids, self.logprobs = _as_logits(topk.ids), _as_logits(topk.logprobs)
        self.shape, self.width = (*topk.shape[:-1], self.classes), self.k
        self.data = (self.ids, self.logprobs)

    def describe(self) -> str:
        return f"top-k shape {(*self.shape[:-1], self.k)} of vocab_size {self.classes}"

    def source(self, device: torch.device) -> _TopkSource:
        return _TopkSource(self, device)


class _TopkSource:
    def __init__(self, x: _TopkInput, device: torch.device):
        self.x, self.device = x, device
        self.ids, self.logprobs = _flat(x.ids, x.k), _flat(x.logprobs, x.k)
        self.bad = {problem: _FirstBadRow(device) for problem in PROBLEMS}

    def chunk(self, start: int, stop: int, view: int | None) -> TopkChunk:
        ids = _to_device(self.ids[start:stop], self.device)  # (B, k)
        logprobs = _to_device(self.logprobs[start:stop], self.device)
        if not _is_integer(ids) or _is_integer(logprobs):
            raise ValueError(f"{self.x.name}: topk_ids have dtype {ids.dtype} and topk_logprobs "
                             f"{logprobs.dtype}; pass integer ids and float log-probabilities")  # fmt: skip
        chunk = TopkChunk.from_topk(ids.long(), logprobs, self.x.classes, view or self.x.k)
        for problem, rows in chunk.problems.items():
            self.bad[problem].update(rows, start)
        return chunk

    def top1_and_nll(self, start: int, stop: int, y: torch.Tensor):
        chunk = self.chunk(start, stop, None)
        return chunk.order[:, 0], chunk.nll(y)[0].sum()

    def raise_if_bad(self, model: int | None, lead_shape: tuple[int, ...]) -> None:
        for problem, bad in self.bad.items():
            what = f"{PROBLEMS[problem]} in {self.x.name}"
            _raise_if_bad(bad, what, lead_shape, InvalidTopK, model, problem)


def _check_logit_shapes(first, other) -> None:
    if first.shape[:-1] != other.shape[:-1] or first.classes != other.classes:
        raise ValueError(
            f"shape mismatch: {first.name} has {first.describe()} but {other.name} has "
            f"{other.describe()}; pass logits of the same (..., K) shape for the same examples"
        )
    t_shape = first.shape
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


def _compute_device(teacher, *models) -> torch.device:
    """The teacher's accelerator if it has one, else the first model's that has, else CPU."""
    for x in (teacher, *models):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


# Torch threads for the streamed metrics on the CPU. Their chunks hold at most
# _MAX_CHUNK_ELEMENTS values, too few for threads to pay, and threads that must meet after
# every small operation wait on each other's time slices when other processes want the
# cores: on this 2-core machine a top-20 compare of 100,000 tokens took 5.8 s on one thread
# and 65 s on two while another compare ran beside it, and 3.8 to 4.7 s either way at load 3.
STREAM_THREADS = 1


@contextmanager
def _streaming(device: torch.device):
    """No autograd, and STREAM_THREADS torch threads while a pass runs on the CPU."""
    before = torch.get_num_threads()
    cpu = device.type == "cpu" and before > STREAM_THREADS
    if cpu:
        torch.set_num_threads(STREAM_THREADS)
    try:
        with torch.no_grad():
            yield
    finally:
        if cpu:
            torch.set_num_threads(before)


def _chunk_rows(chunk_size: int, k: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; pass a positive number of rows")
    return max(1, min(chunk_size, _MAX_CHUNK_ELEMENTS // k))


def _to_device(x: Array, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    # np.array copies just this chunk (memmaps are read-only; torch wants writable memory).
    return torch.from_numpy(np.array(x)).to(device)


# ---------------------------------------------------------------- accumulators


class _Chunk:
    """One model's side of a chunk: computed once, the teacher's shared by every model.
    kdaudit.metrics.topk.TopkChunk is the same for a top-k view."""

    def __init__(self, z: torch.Tensor):
        """z: (B, K) logits in their input dtype."""
        self.log_p = torch.log_softmax(z.double(), dim=1)  # (B, K) float64
        self.p = self.log_p.exp()
        # Sorting the input dtype gives the same order as float64 (the cast is exact).
        self.order = _ranking(z)

    def aligned(self, other: _Chunk):
        """(log p, log q, p, q): both (B, K) distributions, class by class."""
        return self.log_p, other.log_p, self.p, other.p

    def nll(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -log p(y), and (B,) False: the label is always among the K classes."""
        return -self.log_p.gather(1, y[:, None])[:, 0], torch.zeros_like(y, dtype=torch.bool)

    def dense_probs(self) -> torch.Tensor:
        return self.p


class _Accumulators:
    """Every accumulator the registered metrics name, for one model; `totals()` gives 0-d
    tensors on the device."""

    def __init__(self, k: int, device: torch.device, with_procrustes=True, topk=False):
        """k: the number of classes; topk: the inputs are top-k views (TopkChunk)."""
        metrics = [m for m in METRICS.entries() if topk or not m.topk_only]
        names = dict.fromkeys(m.accumulator for m in metrics)
        self.parts = [_accumulator(name, k, device, with_procrustes) for name in names]

    def update(self, teacher, model, y: torch.Tensor) -> None:
        """teacher, model: the two chunks (_Chunk or TopkChunk); y: (B,) int64 labels."""
        for part in self.parts:
            part.update(teacher, model, y)

    def totals(self) -> dict[str, torch.Tensor]:
        return {name: v for part in self.parts for name, v in part.totals().items()}


def _accumulator(name: str, k: int, device: torch.device, with_procrustes: bool):
    if name == "procrustes" and not with_procrustes:
        return _NoProcrustes(device)
    return ACCUMULATORS[name](k, device)


def _ranking(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) int64 classes by descending logit; a stable sort breaks ties to lower index."""
    return torch.sort(logits, dim=1, descending=True, stable=True).indices


class _DistributionSums:
    """Sums over examples of activation distance, JS divergence and cross-entropy (nats)."""

    def __init__(self, k: int, device: torch.device):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.activation, self.js, self.nll = zero.clone(), zero.clone(), zero.clone()

    def update(self, t: _Chunk, c: _Chunk, y: torch.Tensor) -> None:
        """t, c: the teacher's and the model's chunks; y: (B,) labels."""
        log_p, log_q, p, q = t.aligned(c)  # (B, K), or (B, 2k + 1) for top-k views
        self.activation += (p - q).norm(dim=1).sum()
        self.js += _js_divergence(log_p, log_q, p, q).sum()
        self.nll += c.nll(y)[0].sum()

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
    """int64 counts over rankings and top-1 labels, and the top-1 pairs for VI."""

    def __init__(self, k: int, device: torch.device):
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.rank_diff, self.agree, self.model_correct = zero.clone(), zero.clone(), zero.clone()
        self.teacher_correct, self.agree_teacher_correct = zero.clone(), zero.clone()
        self.pairs = _TopPairCounts(k, device)

    def update(self, t: _Chunk, c: _Chunk, y: torch.Tensor) -> None:
        """t, c: the teacher's and the model's chunks (classes by rank); y: (B,) labels."""
        order_t, order_c = t.order, c.order  # (B, K)
        top_t, top_c = order_t[:, 0], order_c[:, 0]
        agree, teacher_right = top_t == top_c, top_t == y
        self.rank_diff += (order_t != order_c).sum()
        self.agree += agree.sum()
        self.teacher_correct += teacher_right.sum()
        self.agree_teacher_correct += (agree & teacher_right).sum()
        self.model_correct += (top_c == y).sum()
        self.pairs.update(top_t, top_c)

    def totals(self) -> dict[str, torch.Tensor]:
        return {
            "rank_diff": self.rank_diff,
            "agree": self.agree,
            "teacher_correct": self.teacher_correct,
            "agree_teacher_correct": self.agree_teacher_correct,
            "model_correct": self.model_correct,
            "vi": self.pairs.variation_of_information(),
        }


class _TopPairCounts:
    """Sparse contingency table of (teacher top-1, model top-1): exact VI for any K.

    Only the pairs that occur are stored, as codes t * K + c with their counts, so memory
    is O(distinct pairs) <= O(min(N, K^2)) rather than a dense K x K table (8 GB of int64 at
    K = 32,000). Chunk codes wait in `pending` (at least _PAIR_MERGE_MIN, and at least as
    many as there are distinct pairs) before a merge, so merging costs O(N log N) overall.
    """

    def __init__(self, k: int, device: torch.device):
        self.k = k
        self.codes = torch.zeros(0, dtype=torch.int64, device=device)  # (P,) sorted, unique
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)  # (P,)
        # Preallocated: a new small tensor kept per chunk would pin the heap between the
        # chunk's large temporaries, and glibc's resident memory then grew with N.
        self.pending = torch.empty(_PAIR_MERGE_MIN, dtype=torch.int64, device=device)
        self.n_pending = 0

    def update(self, top_t: torch.Tensor, top_c: torch.Tensor) -> None:
        """top_t, top_c: (B,) int64 top-1 classes."""
        codes = top_t * self.k + top_c
        if self.n_pending + codes.numel() > self.pending.numel():
            self._merge(codes)
        else:
            self.pending[self.n_pending : self.n_pending + codes.numel()] = codes
            self.n_pending += codes.numel()

    def _merge(self, extra: torch.Tensor | None = None) -> None:
        new = self.pending[: self.n_pending]
        if extra is not None:
            new = torch.cat([new, extra])
        codes = torch.cat([self.codes, new])
        counts = torch.cat([self.counts, torch.ones_like(new)])
        self.codes, inverse = torch.unique(codes, return_inverse=True)
        self.counts = torch.zeros_like(self.codes).index_add_(0, inverse, counts)
        self.n_pending = 0
        if self.codes.numel() > self.pending.numel():  # keeps merging O(N log N) overall
            self.pending = torch.empty_like(self.codes)

    def variation_of_information(self) -> torch.Tensor:
        """VI = 2 H(X,Y) - H(X) - H(Y) in nats, X the teacher's and Y the model's top-1."""
        self._merge()
        marginal_t = torch.zeros(self.k, dtype=torch.int64, device=self.codes.device)
        marginal_c = torch.zeros_like(marginal_t)
        marginal_t.index_add_(0, self.codes // self.k, self.counts)  # (K,)
        marginal_c.index_add_(0, self.codes % self.k, self.counts)
        h_xy = _entropy_of_counts(self.counts)
        h_x, h_y = _entropy_of_counts(marginal_t), _entropy_of_counts(marginal_c)
        # VI >= 0 exactly; the three entropies are each rounded, so identical labelings can
        # land a few ulps below zero.
        return (2.0 * h_xy - h_x - h_y).clamp_min(0.0)


# Codes merged at once at least: merging every small chunk would re-sort the table each time.
_PAIR_MERGE_MIN = 1 << 16


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

    def update(self, t: _Chunk, c: _Chunk, y: torch.Tensor) -> None:
        """The two chunks' (B, K) float64 softmax rows (top-k: filled with the tail estimate)."""
        p_t, p_c = t.dense_probs(), c.dense_probs()
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


class _NoProcrustes:
    """Stands in for _ProcrustesMoments when K is above the limit: the distance is nan."""

    def __init__(self, device: torch.device):
        self.nan = torch.full((), math.nan, dtype=torch.float64, device=device)

    def update(self, t: _Chunk, c: _Chunk, y: torch.Tensor) -> None:
        pass

    def totals(self) -> dict[str, torch.Tensor]:
        return {"procrustes": self.nan}


class _TopkSets:
    """Top-k views only: how many of the teacher's top-k classes are in the model's top-k,
    and at how many positions the label is outside the model's top-k."""

    def __init__(self, k: int, device: torch.device):
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.overlap, self.label_outside = zero.clone(), zero.clone()

    def update(self, t: TopkChunk, c: TopkChunk, y: torch.Tensor) -> None:
        self.overlap += c.lookup(t.order)[1].sum()
        self.label_outside += c.nll(y)[1].sum()

    def totals(self) -> dict[str, torch.Tensor]:
        return {"overlap": self.overlap, "label_outside": self.label_outside}


class _FirstBadRow:
    """First flattened row index flagged bad (-1 if none), kept on the device."""

    def __init__(self, device: torch.device):
        self.row = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, bad: torch.Tensor, offset: int) -> None:
        """bad: (B,) bool, the rows offset, offset + 1, ... of the flattened input."""
        self.row = _first_bad_row(bad, offset, self.row)


def _first_bad_row(bad: torch.Tensor, offset: int, so_far: torch.Tensor) -> torch.Tensor:
    """Keeps the check on the device: no host sync inside the chunk loop."""
    first_here = torch.where(bad.any(), offset + bad.int().argmax(), -1)
    return torch.where(so_far >= 0, so_far, first_here)


# ---------------------------------------------------------------- finalising


def _to_host(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device sync per call; int64 counts stay exact in float64 below 2**53."""
    values = torch.stack([v.double() for v in totals.values()]).cpu().tolist()
    return dict(zip(totals, values, strict=True))


def _raise_if_bad(check: _FirstBadRow, what: str, lead_shape, error, *args) -> None:
    """Raise error(message, *args) naming the first bad row, if there is one."""
    row = int(check.row)
    if row >= 0:
        where = tuple(int(i) for i in np.unravel_index(row, lead_shape))
        model, *rest = args
        raise error(
            f"{what}: first bad row is {row} of the flattened logits (index {where} of the "
            "leading dimensions); remove or fix those rows before comparing",
            model,
            row,
            *rest,
        )


def _finalised(totals: dict[str, float], n: int, k: int, topk: bool) -> dict[str, float | int]:
    """Every registered metric from the summed totals (all divisions happen there); k is
    the length of the compared rankings (K, or the top-k view's k)."""
    return {m.name: m.finalise(totals, n, k) for m in METRICS.entries() if topk or not m.topk_only}


# name -> accumulator class (k, device): update(teacher chunk, model chunk, labels), totals()
ACCUMULATORS = {
    "distributions": _DistributionSums,
    "labelings": _LabelingCounts,
    "procrustes": _ProcrustesMoments,
    "topk_sets": _TopkSets,
}
