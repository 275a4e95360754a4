"""MNIST-1D: 10-class 1D signals from the `mnist1d` package's procedural generator (no download)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kdaudit.data import TensorData
from kdaudit.data.cache import cached_arrays, key_of
from kdaudit.data.configs import MNIST1DConfig


def build_mnist1d(cfg: MNIST1DConfig, data_dir: Path) -> TensorData:
    x, y = _cached(cfg)
    n = cfg.n_train
    return TensorData(
        torch.from_numpy(x[:n]).unsqueeze(1),  # (N, 1, 40): one channel for conv models
        torch.from_numpy(y[:n]),
        torch.from_numpy(x[n : n + cfg.n_test]).unsqueeze(1),
        torch.from_numpy(y[n : n + cfg.n_test]),
        num_classes=10,
    )


def _cached(cfg: MNIST1DConfig) -> tuple[np.ndarray, np.ndarray]:
    """Generation takes seconds: keep the arrays in the cache directory, keyed by the config."""

    def generate():
        x, y = _generate(cfg)
        return {"x": x, "y": y}

    arrays = cached_arrays("mnist1d", f"mnist1d-{key_of(asdict(cfg), 12)}", generate)
    return arrays["x"], arrays["y"]


def _generate(cfg: MNIST1DConfig) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # The generator makes num_samples // 10 per class and splits by a float fraction;
    # generate a multiple of 10 with no split and cut train/test here, exactly.
    args.num_samples = 10 * math.ceil((cfg.n_train + cfg.n_test) / 10)
    args.train_split = 1.0
    args.seed = cfg.seed
    args.shuffle_seq = cfg.shuffle_seq
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave it as found
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"].astype(np.float32), d["y"].astype(np.int64)
