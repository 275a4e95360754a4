"""Caches live in the cache directory, never in the data directory (a read-only or shared
data directory is left exactly as it was)."""

from __future__ import annotations

import numpy as np

from kdaudit.data import load_data
from kdaudit.data.mnist1d import MNIST1DConfig


def test_mnist1d_is_generated_once_into_the_cache_not_the_data_dir(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("KDAUDIT_CACHE", str(cache))
    cfg = MNIST1DConfig(n_train=200, n_test=50, seed=7)
    first = load_data(cfg, data)
    assert list(data.iterdir()) == []
    (entry,) = (cache / "mnist1d").glob("mnist1d-*.npz")
    with np.load(entry) as f:
        np.testing.assert_array_equal(f["y"][:200], first.train_y.numpy())
    load_data.cache_clear()
    second = load_data(cfg, data)  # read back from the cache: the same arrays
    assert np.array_equal(first.train_x.numpy(), second.train_x.numpy())
    assert list(data.iterdir()) == []
