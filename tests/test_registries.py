"""Tests through the registries (STYLE.md habit 10, as timm parametrizes over list_models()):
every registered model, dataset, condition and metric gets the same checks on tiny CPU
fixtures. Nothing here lists the registries' names: a new entry is tested as it is
registered, and one that has no case yet fails a test saying what to add.

The user-code entries of the model and dataset registries (`factory`, `in_memory`: your own
model or data, from a config or passed to kdaudit.audit) build whatever the user's code
returns; tests/test_api.py covers them.
"""

from __future__ import annotations

import io
import math
import pickle
import tarfile
from dataclasses import MISSING, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from kdaudit.conditions import CONDITIONS, ROLES, builtin, resolve
from kdaudit.conditions.objectives import cross_entropy
from kdaudit.config import load_config
from kdaudit.data import DATASETS, load_data
from kdaudit.engine.loop import train
from kdaudit.engine.run import build_run, execute
from kdaudit.engine.teachers import Teachers
from kdaudit.metrics import METRICS, TopK, functional_metrics, functional_similarity
from kdaudit.metrics.streaming import ACCUMULATORS
from kdaudit.models import MODELS, build_model
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import write_config
from tests.test_audio import AUDIO_WRITERS, write_fsdd
from tests.test_features import FEATURES
from tests.test_metrics import centred_unit, probs
from tests.test_stacked import REGISTERED, USER_CODE
from tests.test_text import write_text
from tests.test_vision import FAKE_WRITERS

USER_CODE_MODULES = {"kdaudit.models.factory", "kdaudit.data.user"}  # where those entries live


def _named(registry, name: str, overrides: dict):
    """The entry's config with `name` set explicitly, as a config file gives it."""
    return registry.get(name).config(**{**overrides, "name": name})


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _registered(registry) -> list[str]:
    return sorted(set(registry.names()) - USER_CODE)


@pytest.mark.parametrize("registry", [MODELS, DATASETS], ids=lambda r: r.kind)
def test_the_entries_left_to_test_api_are_exactly_the_user_code_ones(registry):
    assert set(registry.names()) >= USER_CODE
    for name in USER_CODE:  # your own code: covered by tests/test_api.py, not here
        assert registry.get(name).build.__module__ in USER_CODE_MODULES, name


# A config class shared by entries would default to another entry's name: entry.config()
# then builds that other entry (resnet50 was once a ResNet-18 this way).
@pytest.mark.parametrize(
    "registry, name",
    [pytest.param(r, n, id=f"{r.kind}-{n}") for r in (MODELS, DATASETS) for n in _registered(r)],
)
def test_an_entrys_default_config_names_the_entry(registry, name):
    (field,) = [f for f in fields(registry.get(name).config) if f.name == "name"]
    assert field.default in (MISSING, name), (
        f"{registry.kind} {name}: {registry.get(name).config.__name__}() names "
        f"{field.default!r}, so building it builds {field.default!r}, not {name!r}"
    )


# ---------------------------------------------------------------- models

K = 4  # classes of the model checks


def _model_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 for the model's tiny case: inputs and labels, one per logit row."""
    _, shape, tokens = REGISTERED[name]
    g = torch.Generator().manual_seed(0)
    if tokens:
        x = torch.randint(0, K, (2, *shape), generator=g)  # (B, T)
        return x, torch.roll(x, -1, 1).flatten()
    return torch.randn(2, *shape, generator=g), torch.tensor([1, 3])


def test_every_registered_model_has_a_case():
    missing = sorted(set(MODELS.names()) - USER_CODE - set(REGISTERED))
    assert not missing, (
        f"add a tiny config for {missing} to REGISTERED in tests/test_stacked.py: "
        "(config overrides, input shape, token inputs)"
    )


@pytest.mark.parametrize("name", _registered(MODELS))
def test_every_model_is_seeded_and_trains(name):
    """The initial weights are a pure function of the seed; a batch of 2 gives finite logits
    (..., K) and a finite gradient on every trainable parameter."""
    if name not in REGISTERED:
        pytest.fail(f"add a tiny config for {name} to REGISTERED in tests/test_stacked.py")
    overrides, shape, _ = REGISTERED[name]
    cfg = _named(MODELS, name, overrides)
    model = build_model(cfg, shape, K, init_seed=0)
    torch.manual_seed(12345)  # the global RNG state must not matter
    again = build_model(cfg, shape, K, init_seed=0)
    assert _same_state(model.state_dict(), again.state_dict())
    other = build_model(cfg, shape, K, init_seed=1)
    assert not _same_state(model.state_dict(), other.state_dict())

    x, y = _model_inputs(name)
    model.train()
    logits = model(x)
    assert logits.shape[0] == 2 and logits.shape[-1] == K
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, -2), y).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


# ---------------------------------------------------------------- datasets


def _write_cifar10(root: Path) -> None:
    """The python-pickle tar.gz: five training batches and a test batch of 3 images each."""
    rng = np.random.default_rng(0)
    archive = root / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)  # R, G, B planes per row
            blob = pickle.dumps({b"data": rows, b"labels": [1, 2, 9]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _write_imagenet(root: Path) -> None:
    """Class folders imagenet/{train,val}/<wnid>/*.png of non-square images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for wnid in ("n0001", "n0002"):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


# Per dataset: a writer of tiny files in its real on-disk format (None: generated data) and
# config overrides. Writers come from the dataset's own test module where it has one.
DATASET_CASES = {
    "mnist1d": (None, {"n_train": 40, "n_test": 20}),
    "fashion_mnist": (FAKE_WRITERS["fashion_mnist"], {"download": False}),
    "svhn": (FAKE_WRITERS["svhn"], {"download": False}),
    "tinyimagenet": (FAKE_WRITERS["tinyimagenet"], {"download": False}),
    "cifar10": (_write_cifar10, {"download": False}),
    "imagenet": (_write_imagenet, {"image_size": 16}),
    "fsdd": (write_fsdd, {"n_files": 70}),
    "speechcommands": (AUDIO_WRITERS["speechcommands"], {"download": False}),
    "urbansound8k": (AUDIO_WRITERS["urbansound8k"], {"download": False}),
    "tinyshakespeare": (write_text, {"block_size": 8, "download": False}),
    "tinyshakespeare_tha": (write_text, {"block_size": 8, "download": False}),
}
# name -> the reason, naming the test that covers it (a dataset that cannot be faked cheaply)
DATASET_SKIPS: dict[str, str] = {}


def test_every_registered_dataset_has_a_case():
    missing = sorted(set(DATASETS.names()) - USER_CODE - set(DATASET_CASES) - set(DATASET_SKIPS))
    assert not missing, (
        f"add a case for {missing} to DATASET_CASES in tests/test_registries.py (a writer of "
        "tiny files in its real on-disk format, and config overrides), or to DATASET_SKIPS "
        "with the test that covers it"
    )
    assert not set(DATASET_CASES) & set(DATASET_SKIPS)


def _rows(batch: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    """Examples in one eval batch: its rows, or its kept positions (sequences)."""
    x, keep = batch
    return len(x) if keep is None else int(keep.sum())


@pytest.mark.parametrize("name", _registered(DATASETS))
def test_every_dataset_loads_and_keeps_the_data_contract(name, tmp_path, monkeypatch):
    if name in DATASET_SKIPS:
        pytest.skip(DATASET_SKIPS[name])
    if name not in DATASET_CASES:
        pytest.fail(f"add a case for {name} to DATASET_CASES in tests/test_registries.py")
    writer, overrides = DATASET_CASES[name]
    monkeypatch.setattr("kdaudit.data.files.checksum_ok", lambda path, resource: True)
    if writer is not None:
        writer(tmp_path)
    data = load_data(_named(DATASETS, name, overrides), tmp_path)

    assert isinstance(data.cacheable, bool)
    assert isinstance(data.num_classes, int) and data.num_classes >= 2 and data.n_train >= 2
    for split in ("train", "test"):
        labels = data.labels(split)
        assert labels.dtype == torch.int64 and labels.dim() == 1 and len(labels) > 0, split
        assert int(labels.min()) >= 0 and int(labels.max()) < data.num_classes, split
        batches = list(data.eval_batches(split, 3))
        assert all(x.shape[1:] == data.input_shape for x, _ in batches), split
        assert sum(map(_rows, batches)) == len(labels), split
    x, y = data.train_batch(torch.arange(2))
    assert x.shape == (2, *data.input_shape)
    assert y.dtype == torch.int64 and y.shape[0] == 2
    assert int(y.min()) >= 0 and int(y.max()) < data.num_classes


# ---------------------------------------------------------------- conditions

# User losses join the registry per process (from a config); tests/test_own_loss.py covers them.
ALPHA_CONDITIONS = [c.name for c in builtin() if "alpha" in c.params]


def test_every_condition_without_alpha_trains_with_plain_cross_entropy():
    """Those are the teacher and the SIDDO reference itself; any other would escape the
    alpha = 0 test below."""
    for entry in CONDITIONS.entries():
        assert entry.role in ROLES and set(entry.params) <= {"alpha", "temperature"}, entry.name
        if "alpha" not in entry.params:
            assert resolve(entry.objective) is cross_entropy and not entry.needs_teacher, (
                f"{entry.name} has no alpha, so no alpha = 0 test covers it: add one"
            )


def test_every_objective_resolves_and_every_control_is_a_registered_control():
    for entry in CONDITIONS.entries():
        assert callable(resolve(entry.objective)), entry.name
        if entry.is_treatment:
            assert entry.controls, f"treatment {entry.name} names no controls"
        for control in (*entry.controls, *entry.shown_beside):
            assert control in CONDITIONS, f"{entry.name}: unknown control {control!r}"
            if control == entry.remedy_of:  # a remedy is also tested against what it changes
                assert control in entry.shown_beside and CONDITIONS.get(control).is_treatment
                continue
            assert CONDITIONS.get(control).role == "control", f"{entry.name}: {control}"


@pytest.fixture(scope="module")
def paired(tmp_path_factory, data_dir):
    """The protocol's grid at alpha = 0 for SIDDO and every condition with an alpha (one
    teacher seed, one student seed, feature modules for the feature conditions), the
    teacher trained and stored, and the SIDDO run trained."""
    tmp = tmp_path_factory.mktemp("paired")
    protocol = {"conditions": ["siddo", *ALPHA_CONDITIONS], "alphas": [0.0],
                "temperatures": [2.0], "student_seeds": [10],
                "feature_modules": FEATURES["feature_modules"]}  # fmt: skip
    steps = {"epochs": 1, "max_steps": 6}  # 6 Adam steps: moments and bias correction at work
    cfg = load_config(write_config(tmp, protocol=protocol, train=steps))
    grid = expand(cfg)
    data = load_data(cfg.data)
    store = RunStore(tmp / "out")
    teachers = Teachers(store, torch.device("cpu"))
    (teacher,) = grid.teachers
    execute(teacher, data, store, teachers, save_weights=True)
    specs = {s.condition: s for s in grid.students}
    return SimpleNamespace(specs=specs, data=data, teachers=teachers,
                           siddo=_trained(specs["siddo"], data, teachers))  # fmt: skip


def _trained(spec, data, teachers) -> dict[str, torch.Tensor]:
    model, objective = build_run(spec, data, teachers)
    train(model, data, objective, spec.train, spec.data_seed)
    return model.state_dict()


@pytest.mark.parametrize("name", ALPHA_CONDITIONS)
def test_alpha_zero_trains_exactly_the_siddo_model(name, paired):
    """Same init seed, same data seed: with the teacher term weighted 0, only pairing is
    left, and the final weights equal SIDDO's bit for bit; at alpha 0.5 they do not."""
    spec, siddo = paired.specs[name], paired.specs["siddo"]
    assert spec.alpha == 0.0
    assert (spec.init_seed, spec.data_seed) == (siddo.init_seed, siddo.data_seed)
    assert _same_state(_trained(spec, paired.data, paired.teachers), paired.siddo)
    treated = _trained(replace(spec, alpha=0.5), paired.data, paired.teachers)
    assert not _same_state(treated, paired.siddo)


# ---------------------------------------------------------------- metrics


def _top1(z: np.ndarray) -> np.ndarray:
    return np.argsort(-z, axis=1, kind="stable")[:, 0]  # ties: the lower class index


def _agreement(t, m, y, subset=None) -> float:
    agree = _top1(t) == _top1(m)
    return float(agree.mean() if subset is None else agree[subset(t, y)].mean())


def _teacher_correct(t, y):
    return _top1(t) == y


def _vi(t, m, y) -> float:
    a, b = _top1(t), _top1(m)
    return entropy(np.bincount(a)) + entropy(np.bincount(b)) - 2 * mutual_info_score(a, b)


def _procrustes(t, m, y) -> float:
    a, b = centred_unit(probs(t)), centred_unit(probs(m))
    rotation, _ = orthogonal_procrustes(b, a)  # R minimising ||b R - a||_F
    return np.linalg.norm(a - b @ rotation) ** 2


# Independent float64 computations from (teacher logits, model logits, labels), PROTOCOL 4.
ORACLES = {
    "activation_distance": lambda t, m, y: np.linalg.norm(probs(t) - probs(m), axis=1).mean(),
    "rank_disagreement": lambda t, m, y: np.mean(
        np.argsort(-t, axis=1, kind="stable") != np.argsort(-m, axis=1, kind="stable")
    ),
    "prediction_disagreement": lambda t, m, y: 1.0 - _agreement(t, m, y),
    "js_divergence": lambda t, m, y: np.mean(jensenshannon(probs(t), probs(m), axis=1) ** 2),
    "prediction_agreement": _agreement,
    "correct_agreement": lambda t, m, y: _agreement(t, m, y, _teacher_correct),
    "incorrect_agreement": lambda t, m, y: _agreement(t, m, y, lambda t, y: _top1(t) != y),
    "n_teacher_correct": lambda t, m, y: int(_teacher_correct(t, y).sum()),
    "n_teacher_incorrect": lambda t, m, y: int((~_teacher_correct(t, y)).sum()),
    "variation_of_information": _vi,
    "procrustes_distance": _procrustes,
    "accuracy": lambda t, m, y: np.mean(_top1(m) == y),
    "loss": lambda t, m, y: -log_softmax(m, axis=1)[np.arange(len(y)), y].mean(),
}
# Metrics of top-k inputs only (PROTOCOL section 10), from full logits and the view's k.
TOPK_K = 3


def _topk_sets(z, k=TOPK_K) -> np.ndarray:
    return np.argsort(-z, axis=1, kind="stable")[:, :k]  # ties: the lower class index


TOPK_ORACLES = {
    "topk_overlap": lambda t, m, y: np.mean(
        [len(set(a) & set(b)) / TOPK_K for a, b in zip(_topk_sets(t), _topk_sets(m), strict=True)]
    ),
    "n_label_outside_topk": lambda t, m, y: int((_topk_sets(m) != y[:, None]).all(axis=1).sum()),
}


def _as_topk(z: np.ndarray, k=TOPK_K) -> TopK:
    """The top-k file of logits z: ids and float64 log-probs, shuffled within each row."""
    ids = np.random.default_rng(0).permuted(_topk_sets(z, k), axis=1)
    return TopK(ids, np.take_along_axis(log_softmax(z, axis=1), ids, axis=1), z.shape[1])


# PROTOCOL section 4: the functional metrics of the transfer verdict
FUNCTIONAL = {
    "activation_distance",
    "rank_disagreement",
    "prediction_disagreement",
    "js_divergence",
}


def _metric_inputs(n: int = 240, k: int = 6):
    """float32 logits with ties (integer-valued rows, shared by both models in places),
    identical rows, and labels the teacher gets wrong on about a quarter of the examples."""
    rng = np.random.default_rng(7)
    teacher = (2.0 * rng.standard_normal((n, k))).astype(np.float32)
    model = (teacher + rng.standard_normal((n, k))).astype(np.float32)
    teacher[:30] = rng.integers(-2, 3, (30, k))  # ties, at the top too
    model[20:50] = rng.integers(-2, 3, (30, k))
    model[50:60] = teacher[50:60]
    labels = _top1(teacher)
    wrong = rng.random(n) < 0.25
    labels[wrong] = (labels[wrong] + rng.integers(1, k, wrong.sum())) % k
    return teacher, model, labels


def test_every_registered_metric_has_an_oracle():
    topk_only = {m.name for m in METRICS.entries() if m.topk_only}
    missing = sorted(set(METRICS.names()) - topk_only - set(ORACLES))
    missing += sorted(topk_only - set(TOPK_ORACLES))
    assert not missing, (f"add an oracle for {missing} to ORACLES (TOPK_ORACLES for a metric "
                         "of top-k inputs only) in tests/test_registries.py")  # fmt: skip
    stale = sorted((set(ORACLES) | set(TOPK_ORACLES)) - set(METRICS.names()))
    assert not stale, f"ORACLES names metrics that are not registered: {stale}; remove them"


@pytest.mark.parametrize("name", METRICS.names())
def test_every_metric_matches_its_oracle(name):
    metric = METRICS.get(name)
    oracles = TOPK_ORACLES if metric.topk_only else ORACLES
    if name not in oracles:
        pytest.fail(f"add an oracle for {name} to ORACLES in tests/test_registries.py")
    teacher, model, labels = _metric_inputs()
    assert 0 < (_top1(teacher) != labels).sum() < len(labels)  # both subsets present
    t64, m64 = teacher.astype(np.float64), model.astype(np.float64)
    if metric.topk_only:
        result = functional_similarity(_as_topk(t64), _as_topk(m64), labels)
        assert set(result) == set(METRICS.names())
    else:
        result = functional_similarity(teacher, model, labels)
        assert set(result) == {m.name for m in METRICS.entries() if not m.topk_only}
    expected = oracles[name](t64, m64, labels)
    if METRICS.get(name).better is None:  # a count: exact
        assert type(result[name]) is int and result[name] == expected
    else:
        assert type(result[name]) is float and math.isfinite(result[name])
        assert result[name] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_untested_metrics_are_the_counts_and_the_functional_ones_are_protocols_four():
    counts = {m.name for m in METRICS.entries() if m.better is None}
    assert counts == {"n_teacher_correct", "n_teacher_incorrect", "n_label_outside_topk"}
    assert set(functional_metrics()) == FUNCTIONAL
    for metric in METRICS.entries():
        assert metric.accumulator in ACCUMULATORS, metric.name
        assert not metric.functional or metric.better == "lower", metric.name


def test_a_config_class_naming_another_entry_is_refused_at_registration():
    with pytest.raises(ValueError, match="defaults to name 'resnet18'; give it a class of its own"):
        MODELS.register("resnet_other", MODELS.get("resnet18").config)
