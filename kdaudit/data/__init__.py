"""Dataset registry. A dataset is built from its config into in-memory tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kdaudit.registry import Registry


@dataclass(frozen=True)
class TensorData:
    """A train/test split held as tensors: inputs (N, ...) float32, labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        move = lambda t: t.to(device)  # noqa: E731
        return TensorData(
            move(self.train_x),
            move(self.train_y),
            move(self.test_x),
            move(self.test_y),
            self.num_classes,
        )


DATASETS: Registry[TensorData] = Registry("dataset")


def default_data_dir() -> Path:
    """Where datasets live: $KDAUDIT_DATA, else ~/.cache/kdaudit/data."""
    return Path(os.environ.get("KDAUDIT_DATA") or Path.home() / ".cache" / "kdaudit" / "data")


@lru_cache(maxsize=4)
def load_data(cfg, data_dir: Path | None = None) -> TensorData:
    """Build (once per process) the dataset that `cfg` names."""
    return DATASETS.build(cfg, Path(data_dir) if data_dir else default_data_dir())


from kdaudit.data import mnist1d  # noqa: E402,F401  (registers)
