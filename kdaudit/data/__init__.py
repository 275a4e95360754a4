"""Dataset registry. A dataset is built from its config into in-memory tensors.

Importing it loads no torch (TensorData's methods import it): the built-in datasets are
declared (settings, builder by name) in kdaudit.data.configs, so configs are checked before
torch loads, and a dataset's module is imported when one is first built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from kdaudit.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorData:
    """A train/test split held as tensors: inputs (N, ...), labels (N,) int64.

    Inputs are float32, or uint8 images (N, C, H, W) kept compact on the device and turned
    into model inputs per batch by `inputs`: augmentation (uint8), scaling to [0, 1], and
    per-channel normalisation with `mean` / `std` (tensors (C, 1, 1)).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None  # the report's names of the label ids

    def inputs(self, x: torch.Tensor, augment: str = "none") -> torch.Tensor:
        """Model inputs for raw rows `x` of train_x or test_x (augment: training only)."""
        import torch

        if augment != "none":
            from kdaudit.data.augment import AUGMENTATIONS

            if x.dim() != 4:
                raise ValueError(f"augmentation {augment!r} needs images (B, C, H, W)")
            x = AUGMENTATIONS[augment](x)
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    cacheable = True  # one output per example: teacher outputs can be cached per index

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def train_batch(self, idx: torch.Tensor, augment: str = "none"):
        """Model inputs (B, ...) and labels (B,) of the training examples idx (B,).
        index_select: the rows that x[idx] gives, several times faster on the CPU."""
        x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
        return self.inputs(x, augment), y

    def eval_batches(self, split: str, batch_size: int):
        """(inputs, None) in order over a split; None: every output row is an example."""
        x = self.train_x if split == "train" else self.test_x
        for i in range(0, len(x), batch_size):
            yield self.inputs(x[i : i + batch_size]), None

    def labels(self, split: str) -> torch.Tensor:
        return self.train_y if split == "train" else self.test_y

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        import torch

        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


DATASETS: Registry[TensorData] = Registry("dataset")


def default_data_dir() -> Path:
    """Where datasets live: $KDAUDIT_DATA, else ~/.cache/kdaudit/data."""
    return Path(os.environ.get("KDAUDIT_DATA") or Path.home() / ".cache" / "kdaudit" / "data")


@lru_cache(maxsize=4)
def load_data(cfg, data_dir: Path | None = None) -> TensorData:
    """Build (once per process) the dataset that `cfg` names."""
    return DATASETS.build(cfg, Path(data_dir) if data_dir else default_data_dir())


from kdaudit.data import configs  # noqa: E402,F401  (declares the built-in datasets)
