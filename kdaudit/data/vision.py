"""Image datasets, held as uint8 tensors (N, C, H, W) and normalised per batch on the device.

Files live under the data directory (`--data-dir`, $KDAUDIT_DATA) in the layout of their
source. Those that the source lets us download are fetched with a checksum check; the others
stop with a message that names the files, where they go and where to get them.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kdaudit.data import TensorData
from kdaudit.data.cache import cached_arrays, key_of
from kdaudit.data.configs import FolderImageConfig, ImageConfig
from kdaudit.data.files import DatasetMissing, Resource, ensure

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tensor_data(cfg, train, test, num_classes: int, mean, std) -> TensorData:
    """uint8 arrays (N, C, H, W) and int labels -> TensorData, cut to n_train / n_test."""
    (xtr, ytr), (xte, yte) = train, test
    xtr, ytr = xtr[: cfg.n_train], ytr[: cfg.n_train]
    xte, yte = xte[: cfg.n_test], yte[: cfg.n_test]
    mean, std = cfg.mean or mean, cfg.std or std
    channels = xtr.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean/std need {channels} values (one per channel)")
    as_col = lambda v: torch.tensor(v, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    return TensorData(
        train_x=torch.from_numpy(np.array(xtr, dtype=np.uint8)),  # copies: owned, writable
        train_y=torch.from_numpy(np.array(ytr, dtype=np.int64)),
        test_x=torch.from_numpy(np.array(xte, dtype=np.uint8)),
        test_y=torch.from_numpy(np.array(yte, dtype=np.int64)),
        num_classes=num_classes,
        mean=as_col(mean),
        std=as_col(std),
    )


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")  # fmt: skip
FASHION_FILES = {  # SHA-256 of the original files
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def build_fashion_mnist(cfg: ImageConfig, data_dir: Path) -> TensorData:
    resources = [
        Resource(f"fashion-mnist/{f}", FASHION_URL + f, sha256=h) for f, h in FASHION_FILES.items()
    ]
    ensure(data_dir, resources, "fashion_mnist",
           f"They are the four IDX .gz files of Zalando's Fashion-MNIST ({FASHION_URL}).",
           cfg.download)  # fmt: skip
    d = data_dir / "fashion-mnist"
    train = (
        read_idx(d / "train-images-idx3-ubyte.gz")[:, None],
        read_idx(d / "train-labels-idx1-ubyte.gz"),
    )
    test = (
        read_idx(d / "t10k-images-idx3-ubyte.gz")[:, None],
        read_idx(d / "t10k-labels-idx1-ubyte.gz"),
    )
    data = _tensor_data(cfg, train, test, 10, (0.5,), (0.5,))
    return replace(data, class_names=FASHION_CLASSES)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian magic (0, 0, dtype 0x08, ndim), dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise DatasetMissing(
            f"{path} is not an unsigned-byte IDX file; replace it with the original"
        )
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetMissing(f"{path} is truncated; delete it and download it again")
    return data.reshape(tuple(int(n) for n in dims))


# ---------------------------------------------------------------- SVHN (.mat)

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}  # fmt: skip


def build_svhn(cfg: ImageConfig, data_dir: Path) -> TensorData:
    resources = [Resource(f"svhn/{f}", SVHN_URL + f, md5=h) for f, h in SVHN_MD5.items()]
    ensure(data_dir, resources, "svhn",
           f"They are the cropped-digit .mat files of SVHN ({SVHN_URL}).", cfg.download)  # fmt: skip
    train, test = (_read_svhn(data_dir / "svhn" / f) for f in SVHN_MD5)
    return _tensor_data(cfg, train, test, 10, HALF, HALF)


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    mat = loadmat(path)
    x = mat["X"].transpose(3, 2, 0, 1)  # (32, 32, 3, N) -> (N, 3, 32, 32)
    y = mat["y"].reshape(-1).astype(np.int64) % 10  # digit 0 is stored as label 10
    return x, y


# ---------------------------------------------------------------- CIFAR-10 (pickles)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


def build_cifar10(cfg: ImageConfig, data_dir: Path) -> TensorData:
    resource = Resource("cifar10/cifar-10-python.tar.gz", CIFAR_URL, md5=CIFAR_MD5)
    (archive,) = ensure(data_dir, [resource], "cifar10",
                        f"It is the python version of CIFAR-10 ({CIFAR_URL}).", cfg.download)  # fmt: skip
    with tarfile.open(archive) as tar:

        def read(name):
            return pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")

        batches = [read(f"data_batch_{i}") for i in range(1, 6)]
        test = read("test_batch")
    train = (
        np.concatenate([b[b"data"] for b in batches]),
        np.concatenate([b[b"labels"] for b in batches]),
    )
    as_images = lambda x: x.reshape(-1, 3, 32, 32)  # noqa: E731  rows are R, G, B planes
    return _tensor_data(cfg, (as_images(train[0]), train[1]),
                        (as_images(test[b"data"]), np.asarray(test[b"labels"])), 10, HALF, HALF)  # fmt: skip


# ---------------------------------------------------------------- TinyImageNet (zip)

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def build_tinyimagenet(cfg: ImageConfig, data_dir: Path) -> TensorData:
    """The official zip: train/<wnid>/images/*.JPEG; the labelled val split is the test set."""
    resource = Resource("tinyimagenet/tiny-imagenet-200.zip", TINY_URL, md5=TINY_MD5)
    (archive,) = ensure(data_dir, [resource], "tinyimagenet",
                        f"It is the official TinyImageNet zip ({TINY_URL}).", cfg.download)  # fmt: skip
    train, test = _cached_decode(archive, {"image_size": 64}, _decode_tinyimagenet)
    return _tensor_data(cfg, train, test, 200, IMAGENET_MEAN, IMAGENET_STD)


def _decode_tinyimagenet(archive: Path, settings: dict):
    with zipfile.ZipFile(archive) as z:
        wnids = z.read("tiny-imagenet-200/wnids.txt").decode().split()
        index = {w: i for i, w in enumerate(wnids)}
        train = [(n, index[n.split("/")[2]]) for n in sorted(z.namelist())
                 if n.startswith("tiny-imagenet-200/train/") and n.endswith(".JPEG")]  # fmt: skip
        val_lines = z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        val = [(f"tiny-imagenet-200/val/images/{line.split()[0]}", index[line.split()[1]])
               for line in sorted(val_lines) if line.strip()]  # fmt: skip

        def load(items):
            return _decode_images((z.read(n) for n, _ in items), 64, [y for _, y in items])

        return load(train), load(val)


# ---------------------------------------------------------------- ImageNet (class folders)


def build_imagenet(cfg: FolderImageConfig, data_dir: Path) -> TensorData:
    """Class-folder layout imagenet/{train,val}/<class>/*.JPEG, resized to image_size
    (held in memory as uint8: 1.28M images at 64x64 take 15.7 GB)."""
    root = data_dir / "imagenet"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DatasetMissing(
            f"imagenet: missing {root}/train and {root}/val (one folder per class, e.g. "
            f"train/n01440764/*.JPEG). ImageNet needs registration at image-net.org; put the "
            f"extracted ILSVRC2012 train and val images there, val sorted into class folders."
        )
    train, test = _cached_decode(root, {"image_size": cfg.image_size}, _decode_folders)
    return _tensor_data(cfg, train[:2], test, len(train[2]), IMAGENET_MEAN, IMAGENET_STD)


def _decode_folders(root: Path, settings: dict):
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}

    def split(name: str):
        items = [(p, index[p.parent.name]) for p in sorted((root / name).glob("*/*"))
                 if p.suffix.lower() in (".jpeg", ".jpg", ".png") and p.parent.name in index]  # fmt: skip
        return _decode_images(
            (p.read_bytes() for p, _ in items), settings["image_size"], [y for _, y in items]
        )

    (xtr, ytr), (xte, yte) = split("train"), split("val")
    return (xtr, ytr, classes), (xte, yte)


# ---------------------------------------------------------------- decoding and caching


def _decode_images(blobs, size: int, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images -> uint8 (N, 3, size, size): RGB, shorter side resized, centre crop."""
    from PIL import Image

    out = np.empty((len(labels), 3, size, size), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        if image.size != (size, size):
            scale = size / min(image.size)
            w, h = round(image.width * scale), round(image.height * scale)
            image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        out[i] = np.asarray(image).transpose(2, 0, 1)
    return out, np.asarray(labels, dtype=np.int64)


def _cached_decode(source: Path, settings: dict, decode):
    """Decoding JPEGs takes minutes: keep the arrays in the cache directory, keyed by the
    source (its name and the sizes and modification times of its files) and the settings."""
    key = key_of({"source": source.name, "files": _fingerprint(source), **settings}, 12)

    def compute():
        return _pack(*decode(source, settings))

    return _unpack(cached_arrays("images", f"{source.stem}-decoded-{key}", compute))


def _fingerprint(source: Path) -> list[int]:
    """[files, total bytes, latest mtime in ns] of a file or of every file under a folder:
    another archive or folder under the same name gets another cache entry."""
    paths = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    stats = [p.stat() for p in paths]
    return [
        len(stats),
        sum(s.st_size for s in stats),
        max((s.st_mtime_ns for s in stats), default=0),
    ]


def _pack(train, test) -> dict:
    packed = {"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]}
    if len(train) > 2:
        packed["classes"] = np.asarray(train[2])
    return packed


def _unpack(f: dict):
    train = (f["train_x"], f["train_y"]) + ((list(f["classes"]),) if "classes" in f else ())
    return train, (f["test_x"], f["test_y"])
