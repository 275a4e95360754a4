"""Shared fixtures: a tiny MNIST-1D audit that trains in well under a second per run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "data": {"name": "mnist1d", "n_train": 300, "n_test": 120},
    "model": {"name": "mlp", "width": 16, "depth": 1},
    "train": {"batch_size": 32, "epochs": 2, "lr": 0.01},
    "protocol": {
        "teacher_seeds": [0],
        "student_seeds": [10, 11],
        "conditions": ["siddo", "kd", "rcd"],
        "alphas": [0.5],
        "temperatures": [1.0],
    },
}


@pytest.fixture(autouse=True, scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Every test reads datasets from one temporary data directory and keeps what it derives
    from them in one temporary cache directory (never the user's)."""
    path = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("KDAUDIT_DATA", str(path))
    mp.setenv("KDAUDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield path
    mp.undo()


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def write_config(tmp_path: Path, **sections) -> Path:
    """TINY with some sections changed: merged key by key, or replaced as a whole when the
    new section names another registered entry (`name`), whose keys differ."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and "name" not in value:
            value = {**raw.get(key, {}), **value}
        raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
