"""Datasets from user code: `data: {factory: "package.module:function", kwargs: {...}}` in a
config, or datasets passed to `kdaudit.audit()` (entry `in_memory`).

A data factory is called as fn(data_dir, **kwargs) and returns (train, test), each a map-style
torch Dataset of (input, label) pairs or a pair of tensors (x, y). Both are materialised once
into TensorData: float32 inputs, int64 labels, K = max label + 1 unless given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdaudit import user_code
from kdaudit.data import TensorData
from kdaudit.data.configs import FactoryDataConfig, InMemoryDataConfig
from kdaudit.user_code import UserCodeError


def build_factory_data(cfg: FactoryDataConfig, data_dir: Path) -> TensorData:
    fn = user_code.import_callable(cfg.factory, "data.factory")
    splits = fn(data_dir, **cfg.kwargs)
    if not isinstance(splits, tuple | list) or len(splits) != 2:
        raise UserCodeError(f"data.factory {cfg.factory} returned {_describe(splits)}; it must "
                            "return (train, test), each a Dataset or (x, y) tensors")  # fmt: skip
    return tensor_data(*splits, cfg.num_classes, f"data.factory {cfg.factory}")


def build_in_memory_data(cfg: InMemoryDataConfig, data_dir: Path) -> TensorData:
    return user_code.recall("data", cfg.sha256)


def in_memory_data(data: TensorData) -> dict:
    """The config section of data passed in memory, registered in this process."""
    digest = fingerprint(data)
    user_code.remember("data", digest, data)
    return {"name": "in_memory", "sha256": digest}


def fingerprint(data: TensorData) -> str:
    """sha256 of the four tensors (dtype, shape and bytes) and the class count."""
    digest = hashlib.sha256(str(data.num_classes).encode())
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- materialising


def tensor_data(train: Any, test: Any, num_classes: int | None, where: str) -> TensorData:
    """(x, y) tensors or map-style Datasets -> TensorData (copies: later changes to the
    caller's objects cannot change an audit's data)."""
    train_x, train_y = _split(train, f"{where}: train")
    test_x, test_y = _split(test, f"{where}: test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserCodeError(f"{where}: train inputs have shape {tuple(train_x.shape[1:])} but "
                            f"test inputs {tuple(test_x.shape[1:])}; they must match")  # fmt: skip
    k = num_classes or int(max(train_y.max(), test_y.max())) + 1
    for split, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() >= k:
            raise UserCodeError(f"{where}: {split} labels span {int(y.min())}..{int(y.max())}, "
                                f"outside 0..{k - 1} for {k} classes")  # fmt: skip
    return TensorData(train_x, train_y, test_x, test_y, num_classes=k)


def _split(split: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _is_pair_of_arrays(split):
        x, y = (_tensor(v, f"{where} {n}") for v, n in zip(split, ("x", "y"), strict=True))
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        x, y = _materialise(split, where)
    else:
        raise UserCodeError(f"{where} is {_describe(split)}; give a map-style Dataset of "
                            "(input, label) pairs or a pair of tensors (x, y)")  # fmt: skip
    if len(x) == 0 or y.shape != (len(x),):
        raise UserCodeError(f"{where}: inputs {tuple(x.shape)} and labels {tuple(y.shape)} do "
                            "not match; labels must be one integer per input (N,), N > 0")  # fmt: skip
    return x.to(torch.float32).clone(), _labels(y, where)


def _is_pair_of_arrays(split: Any) -> bool:
    return (isinstance(split, tuple | list) and len(split) == 2
            and all(isinstance(v, torch.Tensor | np.ndarray) for v in split))  # fmt: skip


def _materialise(dataset: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of a map-style Dataset, stacked: inputs (N, ...) and labels (N,)."""
    inputs, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise UserCodeError(f"{where}[{i}] is {_describe(item)}; items must be "
                                "(input, label) pairs")  # fmt: skip
        inputs.append(_tensor(item[0], f"{where}[{i}] input"))
        labels.append(_tensor(item[1], f"{where}[{i}] label").reshape(()))
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise UserCodeError(f"{where}: inputs have different shapes ({sorted(shapes)[:3]}); "
                            "resize or pad them to one shape in the Dataset")  # fmt: skip
    return torch.stack(inputs), torch.stack(labels)


def _tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray | int | float | np.number):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # strings, objects, dates: torch refuses them
            first = array.flat[0]
            first = first.item() if isinstance(first, np.generic) else first
            raise UserCodeError(f"{where} holds {_kind(array)} values (e.g. {first!r}); labels and inputs must be numbers: map "
                                "class names to indices 0..K-1 first, e.g. names, y = "
                                "np.unique(y, return_inverse=True)")  # fmt: skip
        return torch.as_tensor(array)
    hint = (" (a PIL image: give the Dataset transform=torchvision.transforms.ToTensor())"
            if type(value).__module__.startswith("PIL") else "")  # fmt: skip
    raise UserCodeError(f"{where} is a {type(value).__name__}{hint}; expected a tensor, "
                        "numpy array or number")  # fmt: skip


def _labels(y: torch.Tensor, where: str) -> torch.Tensor:
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise UserCodeError(f"{where}: labels must be class indices 0..K-1, got non-integer "
                            "values (one-hot or soft labels are not supported)")  # fmt: skip
    if y.dtype == torch.bool or y.is_complex():
        raise UserCodeError(f"{where}: labels must be integer class indices, got {y.dtype}")
    return y.to(torch.int64).clone()


def _kind(array: np.ndarray) -> str:
    return {"U": "string", "S": "bytes", "O": "object"}.get(array.dtype.kind, str(array.dtype))


def _describe(obj: Any) -> str:
    size = f" of {len(obj)}" if isinstance(obj, tuple | list) else ""
    return f"a {type(obj).__name__}{size}"
