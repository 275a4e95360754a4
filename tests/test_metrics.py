"""kdaudit.metrics checked against independent references (numpy, scipy, sklearn, mpmath)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from scipy.stats import entropy
from sklearn.metrics import accuracy_score, log_loss, mutual_info_score

from kdaudit.metrics import (
    BETTER,
    FUNCTIONAL_METRICS,
    NonFiniteLogits,
    RowSource,
    accuracy_and_loss,
    functional_similarity,
    functional_similarity_many,
)
from kdaudit.metrics import streaming as metrics

KEYS = {
    "activation_distance",
    "js_divergence",
    "rank_disagreement",
    "prediction_disagreement",
    "prediction_agreement",
    "correct_agreement",
    "incorrect_agreement",
    "n_teacher_correct",
    "n_teacher_incorrect",
    "variation_of_information",
    "procrustes_distance",
    "accuracy",
    "loss",
}
DISTANCES = (
    "activation_distance",
    "js_divergence",
    "rank_disagreement",
    "prediction_disagreement",
    "variation_of_information",
)


def random_pair(n=400, k=7, scale=2.0, noise=1.0, seed=0):
    """Teacher logits, model = teacher + noise (both (n, k) float32), labels (n,) int64."""
    rng = np.random.default_rng(seed)
    teacher = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    model = (teacher + rng.standard_normal((n, k)) * noise).astype(np.float32)
    labels = rng.integers(0, k, n)
    return teacher, model, labels


def probs(logits):
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def assert_same_results(a, b, rel=1e-12):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-15, nan_ok=True), key


# ---------------------------------------------------------------- API


def test_better_and_functional_metrics_cover_the_returned_metrics():
    result = functional_similarity(*random_pair())
    # topk_overlap is tested too, but returned for top-k inputs only (tests/test_topk.py)
    assert set(BETTER) == KEYS - {"n_teacher_correct", "n_teacher_incorrect"} | {"topk_overlap"}
    assert set(BETTER.values()) == {"lower", "higher"}
    assert set(FUNCTIONAL_METRICS) <= set(BETTER)
    assert set(result) == KEYS


def test_returns_python_floats_and_int_counts():
    result = functional_similarity(*random_pair())
    for key, value in result.items():
        expected = int if key.startswith("n_teacher") else float
        assert type(value) is expected, key


# ---------------------------------------------------------------- independent references


def test_js_divergence_matches_scipy():
    teacher, model, labels = random_pair()
    expected = np.mean(jensenshannon(probs(teacher), probs(model), axis=1) ** 2)
    got = functional_similarity(teacher, model, labels)["js_divergence"]
    assert got == pytest.approx(expected, rel=1e-10)


def test_activation_distance_matches_numpy():
    teacher, model, labels = random_pair()
    expected = np.linalg.norm(probs(teacher) - probs(model), axis=1).mean()
    got = functional_similarity(teacher, model, labels)["activation_distance"]
    assert got == pytest.approx(expected, rel=1e-12)


def test_rank_disagreement_matches_numpy_stable_argsort_with_ties():
    rng = np.random.default_rng(1)
    # Small integer logits: many ties, which must break towards the lower class index.
    teacher = rng.integers(-2, 3, (300, 6)).astype(np.float32)
    model = rng.integers(-2, 3, (300, 6)).astype(np.float32)
    labels = rng.integers(0, 6, 300)
    order_t = np.argsort(-teacher, axis=1, kind="stable")
    order_c = np.argsort(-model, axis=1, kind="stable")
    result = functional_similarity(teacher, model, labels)
    assert result["rank_disagreement"] == pytest.approx(np.mean(order_t != order_c), rel=1e-15)
    top_disagree = np.mean(order_t[:, 0] != order_c[:, 0])
    assert result["prediction_disagreement"] == pytest.approx(top_disagree, rel=1e-15)


def test_agreements_on_a_hand_worked_example():
    teacher = [[3, 1, 0], [0, 2, 1], [1, 1, 0], [0, 0, 4], [5, 0, 0]]
    model = [[2, 0, 1], [0, 1, 2], [0, 0, 5], [1, 0, 3], [1, 1, 1]]
    labels = [0, 1, 2, 0, 0]
    # top-1 (ties to the lower index): teacher 0 1 0 2 0, model 0 2 2 2 0.
    # Teacher right on rows 0, 1, 4 (agree on 0, 4); wrong on rows 2, 3 (agree on 3).
    # Rankings differ in 2 + 2 + 3 + 0 + 0 = 7 of 15 positions.
    result = functional_similarity(np.float32(teacher), np.float32(model), np.array(labels))
    assert result["prediction_agreement"] == pytest.approx(3 / 5)
    assert result["prediction_disagreement"] == pytest.approx(2 / 5)
    assert result["correct_agreement"] == pytest.approx(2 / 3)
    assert result["incorrect_agreement"] == pytest.approx(1 / 2)
    assert (result["n_teacher_correct"], result["n_teacher_incorrect"]) == (3, 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["rank_disagreement"] == pytest.approx(7 / 15)
    # Joint top-1 pairs: (0,0) x2, (1,2), (0,2), (2,2); marginals t: 3,1,1 and c: 2,3.
    ln = math.log
    expected_vi = -0.4 * ln(0.4) - 0.8 * ln(0.2) + 1.2 * ln(0.6)
    assert result["variation_of_information"] == pytest.approx(expected_vi, rel=1e-12)


def test_variation_of_information_matches_sklearn():
    teacher, model, labels = random_pair(n=600, k=4, noise=2.0)
    x, y = probs(teacher).argmax(axis=1), probs(model).argmax(axis=1)
    h_x, h_y = entropy(np.bincount(x)), entropy(np.bincount(y))
    expected = h_x + h_y - 2 * mutual_info_score(x, y)
    got = functional_similarity(teacher, model, labels)["variation_of_information"]
    assert got == pytest.approx(expected, rel=1e-10)


def centred_unit(matrix):
    centred = matrix - matrix.mean(axis=0)
    return centred / np.linalg.norm(centred)


def test_procrustes_distance_matches_scipy():
    teacher, model, labels = random_pair()
    a, b = centred_unit(probs(teacher)), centred_unit(probs(model))
    rotation, _ = orthogonal_procrustes(b, a)  # R minimising ||b R - a||_F
    expected = np.linalg.norm(a - b @ rotation) ** 2
    got = functional_similarity(teacher, model, labels)["procrustes_distance"]
    assert got == pytest.approx(expected, rel=1e-9)


def test_loss_matches_torch_cross_entropy_and_sklearn():
    teacher, model, labels = random_pair(scale=1.0)
    logits = torch.from_numpy(model).double()
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    got = functional_similarity(teacher, model, labels)["loss"]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(log_loss(labels, probs(model), labels=range(7)), rel=1e-9)


def test_accuracy_matches_sklearn():
    teacher, model, labels = random_pair(noise=3.0)
    expected = accuracy_score(labels, probs(model).argmax(axis=1))
    assert functional_similarity(teacher, model, labels)["accuracy"] == pytest.approx(expected)


def test_accuracy_and_loss_of_one_model_match_sklearn_and_the_pairwise_metrics():
    teacher, model, labels = random_pair(noise=3.0)
    acc, loss = accuracy_and_loss(model, labels, chunk_size=33)
    assert acc == pytest.approx(accuracy_score(labels, probs(model).argmax(axis=1)), rel=1e-12)
    assert loss == pytest.approx(log_loss(labels, probs(model), labels=range(7)), rel=1e-9)
    pairwise = functional_similarity(teacher, torch.from_numpy(model), labels)
    assert (acc, loss) == (pytest.approx(pairwise["accuracy"]), pytest.approx(pairwise["loss"]))
    with pytest.raises(ValueError, match="(?i)nan or inf"):
        accuracy_and_loss(np.full((3, 2), np.nan), np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("scale", [0.1, 3.0, 300.0])
def test_identical_models_have_zero_distance(scale):
    teacher, _, labels = random_pair(scale=scale)
    result = functional_similarity(teacher, teacher.copy(), labels)
    for key in DISTANCES:
        assert result[key] == 0.0, key
    assert result["procrustes_distance"] == pytest.approx(0.0, abs=1e-10)
    for key in ("prediction_agreement", "correct_agreement", "incorrect_agreement"):
        assert result[key] == 1.0, key


def mp_js_divergence(t_row, c_row):
    """JS divergence in nats of two logit rows, at 50 significant digits."""
    with mpmath.workdps(50):
        p = _mp_softmax(t_row)
        q = _mp_softmax(c_row)
        total = mpmath.mpf(0)
        for pi, qi in zip(p, q, strict=True):
            m = (pi + qi) / 2
            total += pi * mpmath.log(pi / m) + qi * mpmath.log(qi / m)
        return float(total / 2)


def _mp_softmax(row):
    exps = [mpmath.exp(mpmath.mpf(float(v))) for v in row]
    total = mpmath.fsum(exps)
    return [e / total for e in exps]


def test_extreme_logits_stay_finite_and_match_high_precision():
    teacher, model, labels = random_pair(n=30, k=6, scale=300.0, noise=300.0, seed=3)
    result = functional_similarity(teacher, model, labels)
    assert all(math.isfinite(v) for v in result.values())
    assert 0.0 <= result["js_divergence"] <= math.log(2)
    expected = np.mean([mp_js_divergence(t, c) for t, c in zip(teacher, model, strict=True)])
    assert result["js_divergence"] == pytest.approx(expected, rel=1e-12)


def one_hot_logits(classes, k=5):
    logits = np.full((len(classes), k), -500.0, dtype=np.float32)
    logits[np.arange(len(classes)), classes] = 500.0
    return logits


def test_one_hot_like_logits_give_exact_limits():
    teacher = one_hot_logits([0, 1, 2, 3])
    model = one_hot_logits([0, 2, 2, 4])  # rows 1 and 3 put all mass elsewhere
    result = functional_similarity(teacher, model, np.array([0, 1, 0, 3]))
    assert all(math.isfinite(v) for v in result.values())
    assert result["js_divergence"] == pytest.approx(math.log(2) / 2, rel=1e-15)
    assert result["activation_distance"] == pytest.approx(math.sqrt(2) / 2, rel=1e-15)
    # The model is wrong with a 1000-nat margin on rows 1, 2 and 3 (labels 1, 0, 3).
    assert result["loss"] == pytest.approx(3 * 1000.0 / 4, rel=1e-12)


def test_empty_teacher_subset_gives_nan_agreement():
    teacher, model, _ = random_pair()
    labels = teacher.argmax(axis=1)  # the teacher is always right
    result = functional_similarity(teacher, model, labels)
    assert result["n_teacher_incorrect"] == 0
    assert math.isnan(result["incorrect_agreement"])
    assert result["correct_agreement"] == pytest.approx(result["prediction_agreement"])


def test_constant_outputs_give_nan_procrustes():
    teacher, model, labels = random_pair()
    constant = np.tile(teacher[:1], (len(teacher), 1))
    assert math.isnan(functional_similarity(constant, model, labels)["procrustes_distance"])
    assert math.isnan(functional_similarity(teacher, constant, labels)["procrustes_distance"])


def test_gradients_are_ignored():
    teacher, model, labels = random_pair()
    t = torch.from_numpy(teacher).requires_grad_()
    result = functional_similarity(t, torch.from_numpy(model), torch.from_numpy(labels))
    assert_same_results(result, functional_similarity(teacher, model, labels))


# ---------------------------------------------------------------- input forms and chunking


def test_chunk_size_does_not_change_results():
    teacher, model, labels = random_pair(n=500)
    small = functional_similarity(teacher, model, labels, chunk_size=7)
    assert_same_results(small, functional_similarity(teacher, model, labels, chunk_size=10**6))


def test_memmap_input_matches_tensor_input(tmp_path):
    teacher, model, labels = random_pair(n=300)
    for name, array in (("t", teacher), ("c", model), ("y", labels)):
        np.save(tmp_path / f"{name}.npy", array)
    mapped = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in "tcy"]
    from_disk = functional_similarity(*mapped, chunk_size=64)
    tensors = [torch.from_numpy(x) for x in (teacher, model, labels)]
    assert_same_results(from_disk, functional_similarity(*tensors, chunk_size=64))


def test_leading_dimensions_are_flattened(tmp_path):
    teacher, model, labels = random_pair(n=240)
    flat = functional_similarity(teacher, model, labels)
    shaped = [x.reshape(8, 30, *x.shape[1:]) for x in (teacher, model, labels)]
    assert_same_results(functional_similarity(*shaped, chunk_size=17), flat)
    np.save(tmp_path / "t.npy", shaped[0])
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert_same_results(functional_similarity(mapped, shaped[1], shaped[2]), flat)


def test_numpy_and_torch_float32_inputs_agree():
    teacher, model, labels = random_pair()
    tensors = [torch.from_numpy(x) for x in (teacher, model, labels)]
    assert_same_results(
        functional_similarity(*tensors), functional_similarity(teacher, model, labels)
    )
    mixed = functional_similarity(tensors[0], model, labels.astype(np.int32))
    assert_same_results(mixed, functional_similarity(teacher, model, labels))


# ---------------------------------------------------------------- errors


def with_bad_value(array, row, value):
    array = array.copy()
    array[row, 2] = value
    return array


def error_cases():
    t, c, y = random_pair(n=20, k=4)
    return {
        "shape mismatch": (t, c[:, :3], y),
        "labels length/shape mismatch": (t, c, y[:-1]),
        "labels out of range: found label 4": (t, c, np.where(y == 0, 4, y)),
        "labels out of range: found label -1": (t, c, np.where(y == 0, -1, y)),
        "non-finite values (nan or inf) in teacher_logits: first bad row is 5": (
            with_bad_value(t, 5, np.nan),
            c,
            y,
        ),
        "non-finite values (nan or inf) in model_logits: first bad row is 11": (
            t,
            with_bad_value(with_bad_value(c, 11, np.inf), 17, np.nan),
            y,
        ),
        "K=1 classes": (t[:, :1], c[:, :1], y * 0),
        "N == 0": (t[:0], c[:0], y[:0]),
        "pass integer class indices": (t, c, y.astype(np.float64)),
    }


@pytest.mark.parametrize("message", list(error_cases()))
def test_bad_inputs_raise_value_error_naming_the_problem(message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        functional_similarity(*error_cases()[message], chunk_size=4)


def test_non_finite_error_gives_the_leading_index():
    teacher, model, labels = random_pair(n=24, k=4)
    bad = with_bad_value(teacher, 13, -np.inf).reshape(4, 6, 4)
    with pytest.raises(ValueError, match=r"row is 13 .*\(2, 1\)"):
        functional_similarity(bad, model.reshape(4, 6, 4), labels.reshape(4, 6))


# ---------------------------------------------------------------- large K and several models


def dense_vi(x, y, k):
    """VI from a dense K x K contingency table (the reference for the sparse counts)."""
    table = np.zeros((k, k))
    np.add.at(table, (x, y), 1)
    p = table / table.sum()
    return 2 * _entropy(p) - _entropy(p.sum(axis=1)) - _entropy(p.sum(axis=0))


def _entropy(p):
    p = p[p > 0]
    return -np.sum(p * np.log(p))


def test_sparse_variation_of_information_equals_dense_table_and_sklearn(monkeypatch):
    # Small merge buffer and chunks: codes are merged many times, also mid-chunk.
    monkeypatch.setattr(metrics, "_PAIR_MERGE_MIN", 16)
    teacher, model, labels = random_pair(n=3000, k=40, noise=2.5, seed=5)
    got = functional_similarity(teacher, model, labels, chunk_size=23)["variation_of_information"]
    x, y = teacher.argmax(axis=1), model.argmax(axis=1)
    assert got == pytest.approx(dense_vi(x, y, 40), rel=1e-12)
    sk = entropy(np.bincount(x)) + entropy(np.bincount(y)) - 2 * mutual_info_score(x, y)
    assert got == pytest.approx(sk, rel=1e-10)
    unmerged = functional_similarity(teacher, model, labels, chunk_size=10**6)
    monkeypatch.undo()
    assert got == pytest.approx(unmerged["variation_of_information"], rel=1e-12)


def test_large_vocabulary_is_exact_without_k_by_k_tables():
    # K = 40,000: a dense top-1 table and Procrustes moments would need 25.6 GB.
    k, n = 40_000, 24
    rng = np.random.default_rng(2)
    teacher = rng.standard_normal((n, k), dtype=np.float32)
    model = teacher + rng.standard_normal((n, k), dtype=np.float32)
    labels = rng.integers(0, k, n)
    result = functional_similarity(teacher, model, labels, chunk_size=5)
    x, y = teacher.argmax(axis=1), model.argmax(axis=1)
    sk = entropy(np.bincount(x)) + entropy(np.bincount(y)) - 2 * mutual_info_score(x, y)
    assert result["variation_of_information"] == pytest.approx(sk, rel=1e-10, abs=1e-12)
    order_t = np.argsort(-teacher, axis=1, kind="stable")
    order_c = np.argsort(-model, axis=1, kind="stable")
    assert result["rank_disagreement"] == pytest.approx(np.mean(order_t != order_c), rel=1e-15)
    expected_js = np.mean(jensenshannon(probs(teacher), probs(model), axis=1) ** 2)
    assert result["js_divergence"] == pytest.approx(expected_js, rel=1e-9)
    assert math.isnan(result["procrustes_distance"])


def test_procrustes_limit_only_changes_procrustes():
    teacher, model, labels = random_pair(k=7)
    full = functional_similarity(teacher, model, labels)
    assert metrics.PROCRUSTES_MAX_CLASSES >= 7 and not math.isnan(full["procrustes_distance"])
    limited = functional_similarity(teacher, model, labels, procrustes_max_classes=6)
    assert math.isnan(limited["procrustes_distance"])
    unlimited = functional_similarity(teacher, model, labels, procrustes_max_classes=None)
    assert_same_results(unlimited, full)
    del full["procrustes_distance"], limited["procrustes_distance"]
    assert_same_results(limited, full)


def test_many_models_in_one_pass_equal_separate_calls():
    teacher, model, labels = random_pair(n=300)
    others = [model, model * 0.5, np.flip(model, axis=1).copy()]
    together = functional_similarity_many(teacher, others, labels, chunk_size=37)
    for other, result in zip(others, together, strict=True):
        assert result == functional_similarity(teacher, other, labels, chunk_size=37)
    with pytest.raises(ValueError, match="pass at least one"):
        functional_similarity_many(teacher, [], labels)


def test_non_finite_error_names_the_model_of_a_pass():
    teacher, model, labels = random_pair(n=24, k=4)
    with pytest.raises(NonFiniteLogits, match=r"model_logits\[1\]: first bad row is 9") as info:
        functional_similarity_many(teacher, [model, with_bad_value(model, 9, np.nan)], labels)
    assert (info.value.model, info.value.row) == (1, 9)
    with pytest.raises(NonFiniteLogits) as info:
        functional_similarity_many(with_bad_value(teacher, 3, np.inf), [model], labels)
    assert (info.value.model, info.value.row) == (None, 3)


class Rows:
    """A RowSource over an array that records the rows it was asked for."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def read(self, start, stop):
        self.reads.append((start, stop))
        return self.array.reshape(-1, self.shape[-1])[start:stop].copy()


def test_row_sources_are_read_chunk_by_chunk_and_match_arrays():
    teacher, model, labels = random_pair(n=240)
    shaped = [x.reshape(8, 30, *x.shape[1:]) for x in (teacher, model, labels)]
    source = Rows(shaped[1])
    assert isinstance(source, RowSource)
    got = functional_similarity(shaped[0], source, shaped[2], chunk_size=50)
    assert_same_results(got, functional_similarity(teacher, model, labels, chunk_size=50))
    assert source.reads == [(0, 50), (50, 100), (100, 150), (150, 200), (200, 240)]
    acc, loss = accuracy_and_loss(Rows(model), labels)
    assert (acc, loss) == (got["accuracy"], pytest.approx(got["loss"], rel=1e-12))


# ---------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    teacher, model, labels = random_pair(n=1000)
    cpu = functional_similarity(teacher, model, labels, chunk_size=128)
    cuda = [torch.from_numpy(x).cuda() for x in (teacher, model, labels)]
    assert_same_results(functional_similarity(*cuda, chunk_size=128), cpu, rel=1e-9)
    # A CUDA teacher pulls numpy inputs onto its device chunk by chunk.
    mixed = functional_similarity(cuda[0], model, labels, chunk_size=128)
    assert_same_results(mixed, cpu, rel=1e-9)


def test_a_streamed_pass_runs_on_one_cpu_thread_and_restores_the_setting(monkeypatch):
    from kdaudit.metrics import streaming

    seen = []
    real = streaming._FullSource.chunk
    monkeypatch.setattr(streaming._FullSource, "chunk",
                        lambda self, *a: (seen.append(torch.get_num_threads()), real(self, *a))[1])  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        streaming.functional_similarity(z, z + 0.1, torch.zeros(50, dtype=torch.long))
        assert seen and set(seen) == {streaming.STREAM_THREADS}
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
