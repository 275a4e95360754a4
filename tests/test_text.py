"""Character-level language modelling: windows, every test position scored once, the GPT
models, the "tha" variant, and a paired language-model grid end to end."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdaudit.config import load_config
from kdaudit.data import DATASETS, load_data
from kdaudit.data.files import DatasetMissing
from kdaudit.data.text import SHAKESPEARE_SHA256, TextConfig, TokenData, tokenize
from kdaudit.engine.evaluate import predict
from kdaudit.executors import ExecutorConfig, run_grid
from kdaudit.models import MODELS, build_model
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import write_config

SHARED = Path(os.environ.get("KDAUDIT_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
TEXT = "the cat sat on the mat. then the dog ate the hat.\n" * 20


@pytest.fixture(autouse=True)
def no_checksums(monkeypatch):
    """Test texts cannot match the real file's checksum (the real-data test checks it)."""
    monkeypatch.setattr("kdaudit.data.files.checksum_ok", lambda path, resource: True)


def write_text(root: Path, text: str = TEXT) -> None:
    (root / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (root / "tinyshakespeare" / "input.txt").write_text(text)


@pytest.mark.parametrize("n_test", [9, 17, 8 * 4 + 1, 8 * 4 + 5, 8 * 4 + 7])
def test_every_test_position_is_scored_exactly_once(n_test):
    data = TokenData(torch.zeros(50, dtype=torch.long), torch.arange(n_test), n_test, 8, "")
    positions = []  # the index of the token each kept position predicts
    starts, keep = data._windows("test")
    for s, k in zip(starts.tolist(), keep, strict=True):
        positions += [s + 1 + j for j in range(8) if k[j]]
    assert positions == list(range(1, n_test))  # each once, in order
    assert torch.equal(data.labels("test"), torch.arange(1, n_test))


def test_labels_follow_the_order_of_the_scored_positions():
    data = tokenize("".join(chr(97 + i % 26) for i in range(400)), TextConfig(block_size=16))
    inputs = torch.cat([x[keep] for x, keep in data.eval_batches("test", 3)])
    # the text cycles through the alphabet: each label is the letter after its input
    assert torch.equal(data.labels("test"), (inputs + 1) % 26)
    assert len(inputs) == len(data.test_tokens) - 1


def test_train_batch_windows_and_vocabulary(tmp_path):
    write_text(tmp_path)
    data = DATASETS.build(TextConfig(block_size=8, download=False), tmp_path)
    cut = int(len(TEXT) * 0.9)
    assert data.vocab == "".join(sorted(set(TEXT[:cut]))) and data.num_classes == len(data.vocab)
    x, y = data.train_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 8) and torch.equal(y[:, :-1], x[:, 1:])
    assert "".join(data.vocab[i] for i in x[0]) == TEXT[:8]


def test_tha_variant_replaces_every_the(tmp_path):
    write_text(tmp_path)
    tha = DATASETS.build(TextConfig("tinyshakespeare_tha", block_size=8, download=False), tmp_path)
    text = "".join(tha.vocab[i] for i in tha.train_tokens)
    assert "the" not in text and text.count("tha") == TEXT[: int(len(TEXT) * 0.9)].count("the")


def test_missing_text_names_the_file(tmp_path):
    with pytest.raises(DatasetMissing, match="tinyshakespeare/input.txt"):
        DATASETS.build(TextConfig(download=False), tmp_path)


@pytest.mark.skipif(
    not (SHARED / "tinyshakespeare").is_dir(), reason=f"no TinyShakespeare in {SHARED}"
)
def test_real_tinyshakespeare_has_65_characters_and_the_usual_split():
    digest = hashlib.sha256((SHARED / "tinyshakespeare" / "input.txt").read_bytes()).hexdigest()
    assert digest == SHAKESPEARE_SHA256
    data = load_data(TextConfig(download=False), SHARED)
    assert data.num_classes == 65
    assert (
        len(data.train_tokens) == int(1115394 * 0.9)
        and len(data.labels("test")) == 1115394 - 1003854 - 1
    )


@pytest.mark.parametrize("name", ["nanogpt", "picogpt"])
def test_gpt_models_forward_backward_and_causality(name):
    cfg = type(MODELS.get(name).config())(n_layer=2, n_head=2, dropout=0.0)
    model = build_model(cfg, (16,), 11, init_seed=0)
    x = torch.randint(0, 11, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 11)
    logits.sum().backward()
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 11
    model.eval()
    with torch.no_grad():  # changing token 10 must not change the outputs before it
        torch.testing.assert_close(model(x)[:, :10], model(x2)[:, :10])
    assert MODELS.get("picogpt").config().n_embd == MODELS.get("nanogpt").config().n_embd // 2


@pytest.mark.parametrize("stack", [1, 8])
def test_language_model_grid_is_paired_and_kd_runs_the_teacher(tmp_path, stack):
    """alpha = 0 KD reproduces SIDDO bit for bit (same init, windows and dropout masks),
    trained alone or stacked (kdaudit.engine.stacking: dropout stacks only one seed's runs); the
    stored logits cover every test position."""
    write_text(tmp_path / "data")
    path = write_config(
        tmp_path,
        data={"name": "tinyshakespeare", "block_size": 16, "download": False},
        model={"name": "nanogpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1},
        train={"batch_size": 8, "epochs": 1, "max_steps": 6, "lr": 0.01},
        protocol={"alphas": [0.0, 0.9], "conditions": ["siddo", "kd"]},
    )
    cfg = load_config(path)
    out = tmp_path / "out"
    options = ExecutorConfig(stack=stack)
    assert not run_grid(cfg, out, options, "cpu", data_dir=tmp_path / "data").failed
    store, grid = RunStore(out), expand(cfg)
    for spec in grid.students:
        stacked = store.record(spec.run_id)["engine"]["stack"]
        assert stacked is None if stack == 1 else stacked["data_seeds"] == [spec.data_seed] * 3
    n_positions = len(load_data(cfg.data, tmp_path / "data").labels("test"))
    for seed in (10, 11):
        logits = {(s.condition, s.alpha): np.asarray(store.array(s.run_id, "test_logits"))
                  for s in grid.students if s.student_seed == seed}  # fmt: skip
        np.testing.assert_array_equal(logits[("kd", 0.0)], logits[("siddo", None)])
        assert not np.array_equal(logits[("kd", 0.9)], logits[("siddo", None)])
        assert logits[("kd", 0.9)].shape[0] == n_positions
    assert not (out / "runs" / grid.teachers[0].run_id / "train_logits.npy").exists()


def test_predict_on_sequences_returns_one_row_per_position(tmp_path):
    write_text(tmp_path)
    data = DATASETS.build(TextConfig(block_size=8, download=False), tmp_path)
    cfg = type(MODELS.get("nanogpt").config())(n_layer=1, n_head=1, n_embd=8, dropout=0.0)
    model = build_model(cfg, (8,), data.num_classes, init_seed=0)
    assert predict(model, data, "test", 4).shape == (len(data.test_tokens) - 1, data.num_classes)
