"""Top-k inputs (kdaudit.metrics.topk): every metric against full logits at k = V, and each
top-k definition against an independent numpy/scipy/sklearn computation or a hand-worked
example at k < V."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from kdaudit.metrics import (
    METRICS,
    TOPK_MARK,
    InvalidTopK,
    NonFiniteLogits,
    TopK,
    accuracy_and_loss,
    functional_similarity,
    functional_similarity_many,
    topk_approximate,
)
from tests.test_metrics import Rows, centred_unit

FULL = {m.name for m in METRICS.entries() if not m.topk_only}
EXACT = ["prediction_disagreement", "prediction_agreement", "correct_agreement",
         "incorrect_agreement", "n_teacher_correct", "n_teacher_incorrect",
         "variation_of_information", "accuracy"]  # fmt: skip


def logits_with_ties(n=300, v=9, seed=3):
    """float32 teacher and model logits (n, v) with tied values (at the top too), identical
    rows, and labels the teacher gets wrong about a third of the time."""
    rng = np.random.default_rng(seed)
    teacher = (2.0 * rng.standard_normal((n, v))).astype(np.float32)
    model = (teacher + rng.standard_normal((n, v))).astype(np.float32)
    teacher[:30] = rng.integers(-2, 3, (30, v))
    model[20:50] = rng.integers(-2, 3, (30, v))
    model[50:60] = teacher[50:60]
    labels = np.argsort(-teacher, axis=1, kind="stable")[:, 0]
    wrong = rng.random(n) < 0.35
    labels[wrong] = rng.integers(0, v, wrong.sum())
    return teacher, model, labels


def ranked(z: np.ndarray) -> np.ndarray:
    """Classes by descending logit, ties to the lower index (the protocol's stable sort)."""
    return np.argsort(-np.asarray(z, dtype=np.float64), axis=1, kind="stable")


def topk_file(z, k, dtype=np.float64, seed=0) -> TopK:
    """What a server returns: the top k ids and their log-probs, in a shuffled order."""
    ids = np.random.default_rng(seed).permuted(ranked(z)[:, :k], axis=1)
    log_p = np.take_along_axis(log_softmax(np.asarray(z, dtype=np.float64), axis=1), ids, 1)
    return TopK(ids.astype(np.int32), log_p.astype(dtype), z.shape[1])


def assert_metrics_equal(got, expected, rel=1e-9):
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=rel, abs=1e-12, nan_ok=True), name


# ---------------------------------------------------------------- k = V: the full result


@pytest.mark.parametrize("mixed", [False, True])
def test_k_equal_v_gives_every_full_logit_metric(mixed):
    teacher, model, labels = logits_with_ties()
    full = functional_similarity(teacher, model, labels, chunk_size=64)
    v = teacher.shape[1]
    t_in = teacher if mixed else topk_file(teacher, v)  # a full-logit teacher, top-k student
    got = functional_similarity(t_in, topk_file(model, v, seed=1), labels, chunk_size=64)
    assert set(got) == set(METRICS.names())
    assert_metrics_equal(got, full)
    assert got["topk_overlap"] == 1.0 and got["n_label_outside_topk"] == 0
    assert topk_approximate([got], v, v) == ()


def test_k_equal_v_gives_the_full_accuracy_and_loss():
    _, model, labels = logits_with_ties()
    expected = accuracy_and_loss(model, labels)
    got = accuracy_and_loss(topk_file(model, model.shape[1]), labels, chunk_size=50)
    assert got == (expected[0], pytest.approx(expected[1], rel=1e-12))


# ---------------------------------------------------------------- k < V: each definition


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top1_metrics_are_exact_for_any_k(k):
    teacher, model, labels = logits_with_ties()
    full = functional_similarity(teacher, model, labels)
    got = functional_similarity(topk_file(teacher, k), topk_file(model, k, seed=2), labels)
    for name in EXACT:
        assert got[name] == full[name], name
    top_t, top_m = ranked(teacher)[:, 0], ranked(model)[:, 0]  # sklearn as a second oracle
    vi = entropy(np.bincount(top_t)) + entropy(np.bincount(top_m))
    vi -= 2 * mutual_info_score(top_t, top_m)
    assert got["variation_of_information"] == pytest.approx(vi, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_disagreement_and_overlap_are_over_the_top_k(k):
    teacher, model, labels = logits_with_ties()
    got = functional_similarity(topk_file(teacher, k), topk_file(model, k, seed=2), labels)
    a, b = ranked(teacher)[:, :k], ranked(model)[:, :k]
    assert got["rank_disagreement"] == pytest.approx(np.mean(a != b), rel=1e-12)
    overlap = np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)])
    assert got["topk_overlap"] == pytest.approx(overlap, rel=1e-12)


def test_loss_is_exact_inside_the_top_k_and_the_tail_estimate_outside():
    teacher, model, labels = logits_with_ties()
    v, k = model.shape[1], 3
    log_p = log_softmax(model.astype(np.float64), axis=1)
    top = ranked(model)[:, :k]
    inside = (top == labels[:, None]).any(axis=1)
    tail = 1.0 - np.exp(np.take_along_axis(log_p, top, 1)).sum(axis=1)
    expected = np.where(inside, -log_p[np.arange(len(labels)), labels], -np.log(tail / (v - k)))
    got = functional_similarity(teacher, topk_file(model, k), labels)
    assert got["loss"] == pytest.approx(expected.mean(), rel=1e-9)
    assert got["n_label_outside_topk"] == int((~inside).sum()) > 0
    assert topk_approximate([got], k, v) == ("activation_distance", "js_divergence",
                                             "procrustes_distance", "loss")  # fmt: skip
    assert accuracy_and_loss(topk_file(model, k), labels)[1] == pytest.approx(got["loss"], 1e-12)


def test_loss_floors_a_zero_tail_at_the_stored_resolution():
    # k = 2 of V = 4 classes holding all the mass: the tail is 0, the label outside.
    ids = np.array([[2, 0]])
    for dtype in (np.float64, np.float32):
        model = TopK(ids, np.log(np.array([[0.5, 0.5]], dtype=dtype)), 4)
        _, loss = accuracy_and_loss(model, np.array([3]))
        assert loss == pytest.approx(-math.log(np.finfo(dtype).eps / 2), rel=1e-12)


def union_and_tail(p_top, ids, v, union):
    """A model's mass on each class of `union` (its tail estimate where outside its top-k),
    then on one tail bin of the v - len(union) other classes: written out by hand."""
    k = len(ids)
    fill = (1.0 - sum(p_top)) / (v - k)
    mass = dict(zip(ids, p_top, strict=True))
    return np.array([mass.get(i, fill) for i in union] + [fill * (v - len(union))])


def test_js_and_activation_distance_on_a_hand_worked_example():
    # V = 5, k = 2. Teacher: class 0 p=0.6, class 1 p=0.3, tail 0.1 over 3 classes; model:
    # class 1 p=0.5, class 2 p=0.4, tail 0.1. Union {0, 1, 2}, tail bin {3, 4}.
    teacher = TopK(np.array([[1, 0]]), np.log([[0.3, 0.6]]), 5)
    model = TopK(np.array([[2, 1]]), np.log([[0.4, 0.5]]), 5)
    p = np.array([0.6, 0.3, 0.1 / 3, 0.2 / 3])
    q = np.array([0.1 / 3, 0.5, 0.4, 0.2 / 3])
    assert np.allclose(p, union_and_tail([0.6, 0.3], [0, 1], 5, [0, 1, 2]))
    m = (p + q) / 2
    by_hand = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    got = functional_similarity(teacher, model, np.array([0]))
    assert got["js_divergence"] == pytest.approx(by_hand, rel=1e-12)
    assert got["js_divergence"] == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-9)
    assert got["activation_distance"] == pytest.approx(np.linalg.norm(p - q), rel=1e-12)
    assert got["topk_overlap"] == 0.5 and got["rank_disagreement"] == 1.0
    # the same JS as both 5-class distributions filled with the tail estimate
    p5, q5 = [0.6, 0.3, 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.5, 0.4, 0.1 / 3, 0.1 / 3]
    assert got["js_divergence"] == pytest.approx(jensenshannon(p5, q5) ** 2, rel=1e-9)


@pytest.mark.parametrize("k", [1, 4])
def test_js_activation_and_procrustes_match_scipy_on_the_union_plus_tail(k):
    teacher, model, labels = logits_with_ties(n=120)
    v = teacher.shape[1]
    got = functional_similarity(topk_file(teacher, k), topk_file(model, k), labels)
    prob = [np.exp(log_softmax(z.astype(np.float64), axis=1)) for z in (teacher, model)]
    tops = [ranked(z)[:, :k] for z in (teacher, model)]
    js, l2 = [], []
    for i in range(len(labels)):
        union = list(dict.fromkeys([*tops[0][i], *tops[1][i]]))
        pq = [
            union_and_tail(pr[i][top[i]], top[i], v, union)
            for pr, top in zip(prob, tops, strict=True)
        ]
        js.append(jensenshannon(*pq) ** 2)
        l2.append(np.linalg.norm(pq[0] - pq[1]))
    assert got["js_divergence"] == pytest.approx(np.mean(js), rel=1e-9)
    assert got["activation_distance"] == pytest.approx(np.mean(l2), rel=1e-9)
    dense = []
    for pr, top in zip(prob, tops, strict=True):
        kept = np.take_along_axis(pr, top, 1)
        filled = np.repeat(((1 - kept.sum(1)) / (v - k))[:, None], v, axis=1)
        np.put_along_axis(filled, top, kept, 1)
        dense.append(centred_unit(filled))
    rotation, _ = orthogonal_procrustes(dense[1], dense[0])
    procrustes = np.linalg.norm(dense[0] - dense[1] @ rotation) ** 2
    assert got["procrustes_distance"] == pytest.approx(procrustes, rel=1e-8)


def test_ties_within_the_top_k_rank_the_lower_id_first():
    # equal log-probs at ranks 1-2 given in reverse id order: the rank puts id 1 before 4
    teacher = TopK(np.array([[4, 1, 0]]), np.log([[0.3, 0.3, 0.2]]), 6)
    model = TopK(np.array([[1, 4, 2]]), np.log([[0.3, 0.3, 0.1]]), 6)
    got = functional_similarity(teacher, model, np.array([4]))
    assert got["prediction_agreement"] == 1.0 and got["n_teacher_correct"] == 0
    assert got["rank_disagreement"] == pytest.approx(1 / 3)  # rank 3 only: 0 vs 2


# ---------------------------------------------------------------- views, inputs, errors


def test_a_full_logit_input_is_cut_to_the_smallest_k_of_the_top_k_inputs():
    teacher, model, labels = logits_with_ties()
    got = functional_similarity_many(
        teacher, [topk_file(model, 5), topk_file(model, 3)], labels, chunk_size=70
    )
    expected = functional_similarity(topk_file(teacher, 3), topk_file(model, 3), labels)
    assert_metrics_equal(got[0], expected, rel=1e-12)
    assert_metrics_equal(got[1], expected, rel=1e-12)
    forced = functional_similarity(teacher, model, labels, topk=3)
    assert_metrics_equal(forced, expected, rel=1e-12)
    with pytest.raises(ValueError, match="topk=4; pass 1 <= topk <= 3"):
        functional_similarity(teacher, topk_file(model, 3), labels, topk=4)


def test_top_k_inputs_stream_from_row_sources_in_any_chunking():
    teacher, model, labels = logits_with_ties()
    t, m = topk_file(teacher, 4), topk_file(model, 4, dtype=np.float32)
    expected = functional_similarity(t, m, labels, chunk_size=1000)
    shaped = [x.reshape(10, 30, -1) for x in (t.ids, t.logprobs, m.ids, m.logprobs)]
    sources = [Rows(x) for x in shaped]
    got = functional_similarity(
        TopK(sources[0], sources[1], 9), TopK(sources[2], sources[3], 9),
        labels.reshape(10, 30), chunk_size=47,
    )  # fmt: skip
    assert_metrics_equal(got, expected, rel=1e-12)
    assert sources[2].reads[:2] == [(0, 47), (47, 94)]
    on_torch = TopK(torch.from_numpy(m.ids), torch.from_numpy(m.logprobs), 9)
    assert_metrics_equal(functional_similarity(t, on_torch, labels), expected, rel=1e-12)


def bad_rows():
    """Broken top-k inputs (model index 0) and the problem and first row each should name."""
    _, model, _ = logits_with_ties(n=60)
    good = topk_file(model, 3)
    cases = {}
    ids = good.ids.copy()
    ids[7, 1], ids[9, 0] = 9, -1
    cases["ids"] = (TopK(ids, good.logprobs, 9), 7)
    ids = good.ids.copy()
    ids[12, 2] = ids[12, 0]
    cases["repeated"] = (TopK(ids, good.logprobs, 9), 12)
    lp = good.logprobs.copy()
    lp[5, 0], lp[30, 1] = np.nan, np.inf
    cases["non_finite"] = (TopK(good.ids, lp, 9), 5)
    lp = good.logprobs.copy()
    lp[21] = [0.0, -0.5, -1.0]  # probabilities 1, 0.61, 0.37
    cases["mass"] = (TopK(good.ids, lp, 9), 21)
    return cases


@pytest.mark.parametrize("problem", ["ids", "repeated", "non_finite", "mass"])
def test_a_bad_top_k_row_is_named(problem):
    teacher, _, labels = logits_with_ties(n=60)
    broken, row = bad_rows()[problem]
    with pytest.raises(InvalidTopK, match=f"first bad row is {row} ") as info:
        functional_similarity(teacher, broken, labels, chunk_size=8)
    assert (info.value.problem, info.value.model, info.value.row) == (problem, 0, row)
    with pytest.raises(InvalidTopK) as info:
        functional_similarity(broken, teacher, labels, chunk_size=8)
    assert info.value.model is None


def test_rounding_of_stored_log_probs_is_not_a_mass_error():
    _, model, labels = logits_with_ties()
    v = model.shape[1]
    for dtype in (np.float16, np.float32):  # k = V: the mass is 1 up to rounding
        stored = topk_file(model, v, dtype=dtype)
        assert functional_similarity(stored, stored, labels)["js_divergence"] == 0.0


def test_a_nan_in_a_full_logit_input_is_still_named_in_a_top_k_view():
    teacher, model, labels = logits_with_ties(n=60)
    teacher[11, 2] = np.nan
    with pytest.raises(NonFiniteLogits, match="in teacher_logits: first bad row is 11"):
        functional_similarity(teacher, topk_file(model, 3), labels)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: TopK(m.ids[:, :2], m.logprobs, 9), "top-k shape mismatch"),
        (lambda m: TopK(m.ids, m.logprobs, 2), "k=3 ids per row but vocab_size is 2"),
        (lambda m: TopK(m.ids.astype(float), m.logprobs, 9), "topk_ids has dtype float64"),
        (lambda m: TopK(m.ids, m.logprobs.astype(int), 9), "topk_logprobs has dtype int64"),
        (lambda m: TopK(m.ids, m.logprobs, 1), "vocab_size=1"),
        (lambda m: TopK(m.ids, m.logprobs, 8), "shape mismatch: teacher_logits has shape"),
        (lambda m: TopK(m.ids[1:], m.logprobs[1:], 9), "shape mismatch"),
    ],
)
def test_bad_top_k_inputs_raise_one_line_errors(make, message):
    teacher, model, labels = logits_with_ties(n=60)
    with pytest.raises(ValueError, match=message) as info:
        functional_similarity(teacher, make(topk_file(model, 3)), labels)
    assert "\n" not in str(info.value)


def test_the_registry_says_which_metrics_are_approximate():
    assert TOPK_MARK == "top-k approx."
    kinds = {m.name: m.topk for m in METRICS.entries()}
    approx = {"activation_distance", "js_divergence", "procrustes_distance"}
    assert {n for n, kind in kinds.items() if kind == "approx"} == approx
    assert kinds["loss"] == "label" and kinds["rank_disagreement"] == "over_topk"
    assert topk_approximate([{"n_label_outside_topk": 0}], 5, 9) == tuple(
        m for m in kinds if m in approx
    )
    assert topk_approximate([{}], None, 9) == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_top_k_inputs_match_cpu():
    teacher, model, labels = logits_with_ties(n=1000)
    t, m = topk_file(teacher, 4), topk_file(model, 4, dtype=np.float32)
    cpu = functional_similarity(t, m, labels, chunk_size=128)
    cuda = [TopK(torch.from_numpy(x.ids).cuda(), torch.from_numpy(x.logprobs).cuda(), 9)
            for x in (t, m)]  # fmt: skip
    got = functional_similarity(*cuda, torch.from_numpy(labels).cuda(), chunk_size=128)
    assert_metrics_equal(got, cpu, rel=1e-9)
