"""Image datasets on files written in their real on-disk formats, the real Fashion-MNIST
files when present, image models, augmentation and its pairing."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdaudit.config import load_config
from kdaudit.data import DATASETS, load_data
from kdaudit.data.augment import crop_flip, randaugment
from kdaudit.data.files import DatasetMissing, Resource, ensure, fetch
from kdaudit.data.vision import FolderImageConfig, ImageConfig, read_idx
from kdaudit.executors import run_local
from kdaudit.models import MODELS, build_model
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import write_config

SHARED = Path(os.environ.get("KDAUDIT_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
RNG = np.random.default_rng(0)


@pytest.fixture
def no_checksums(monkeypatch):
    """Tiny test files cannot match the real files' checksums."""
    monkeypatch.setattr("kdaudit.data.files.checksum_ok", lambda path, resource: True)


def _images(n, c, h, w):
    return RNG.integers(0, 256, (n, c, h, w), dtype=np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root: Path, n_train=64, n_test=32) -> tuple[np.ndarray, np.ndarray]:
    x, y = _images(n_train, 1, 28, 28)[:, 0], RNG.integers(0, 10, n_train)
    _write_idx(root / "fashion-mnist/train-images-idx3-ubyte.gz", x)
    _write_idx(root / "fashion-mnist/train-labels-idx1-ubyte.gz", y)
    _write_idx(root / "fashion-mnist/t10k-images-idx3-ubyte.gz", _images(n_test, 1, 28, 28)[:, 0])
    _write_idx(root / "fashion-mnist/t10k-labels-idx1-ubyte.gz", RNG.integers(0, 10, n_test))
    return x, y


def _jpeg(array_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format="PNG")  # lossless, so pixels can be checked
    return buf.getvalue()


# ---------------------------------------------------------------- loaders


def test_fashion_mnist_idx_files(tmp_path, no_checksums):
    x, y = write_fashion(tmp_path)
    d = DATASETS.build(ImageConfig("fashion_mnist", download=False), tmp_path)
    assert d.train_x.shape == (64, 1, 28, 28) and d.train_x.dtype == torch.uint8
    np.testing.assert_array_equal(d.train_x[:, 0].numpy(), x)
    np.testing.assert_array_equal(d.train_y.numpy(), y)
    assert d.test_x.shape == (32, 1, 28, 28) and d.num_classes == 10
    inputs = d.inputs(d.train_x[:5])
    torch.testing.assert_close(inputs, (torch.from_numpy(x[:5, None]).float() / 255 - 0.5) / 0.5)
    small = DATASETS.build(
        ImageConfig("fashion_mnist", n_train=10, n_test=5, download=False), tmp_path
    )
    assert small.n_train == 10 and len(small.test_y) == 5


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((4, 3, 3), dtype=np.uint8))
    raw = gzip.decompress(path.read_bytes())[:-5]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetMissing, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason=f"no Fashion-MNIST in {SHARED}")
def test_real_fashion_mnist_files_verify_and_load():
    d = load_data(ImageConfig("fashion_mnist", download=False), SHARED)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(d.train_y.numpy()).tolist() == [6000] * 10
    assert np.bincount(d.test_y.numpy()).tolist() == [1000] * 10


def write_svhn(root: Path) -> np.ndarray:
    from scipy.io import savemat

    x = RNG.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)  # SVHN's (H, W, C, N)
    y = np.array([[10], [1], [2], [3], [10], [9]], dtype=np.uint8)
    (root / "svhn").mkdir(parents=True, exist_ok=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        savemat(root / "svhn" / name, {"X": x, "y": y})
    return x


def write_tinyimagenet(root: Path) -> np.ndarray:
    archive = root / "tinyimagenet" / "tiny-imagenet-200.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    wnids = ["n01", "n02"]
    pixels = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "\n".join(wnids))
        for w in wnids:
            for i in range(2):
                z.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{i}.JPEG", _jpeg(pixels))
        z.writestr("tiny-imagenet-200/val/images/val_0.JPEG", _jpeg(pixels))
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "val_0.JPEG\tn02\t0\t0\t63\t63\n")
    return pixels


FAKE_WRITERS = {
    "svhn": write_svhn,
    "tinyimagenet": write_tinyimagenet,
    "fashion_mnist": write_fashion,
}


def test_svhn_mat_files(tmp_path, no_checksums):
    x = write_svhn(tmp_path)
    d = DATASETS.build(ImageConfig("svhn", download=False), tmp_path)
    assert d.train_x.shape == (6, 3, 32, 32)
    assert d.train_y.tolist() == [0, 1, 2, 3, 0, 9]  # label 10 is the digit 0
    np.testing.assert_array_equal(d.train_x[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))


def test_cifar10_python_pickles(tmp_path, no_checksums):
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    rows = {}
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            rows[name] = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
            blob = pickle.dumps({b"data": rows[name], b"labels": [1, 2, 3]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    d = DATASETS.build(ImageConfig("cifar10", download=False), tmp_path)
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    # a row is the red plane, then green, then blue, each row-major 32x32
    np.testing.assert_array_equal(
        d.train_x[0, 1].numpy(), rows["data_batch_1"][0, 1024:2048].reshape(32, 32)
    )
    assert d.test_y.tolist() == [1, 2, 3]


def test_tinyimagenet_zip_layout_and_decode_cache(tmp_path, no_checksums, monkeypatch):
    pixels = write_tinyimagenet(tmp_path)
    d = DATASETS.build(ImageConfig("tinyimagenet", download=False), tmp_path)
    assert d.train_x.shape == (4, 3, 64, 64) and d.train_y.tolist() == [0, 0, 1, 1]
    assert d.test_y.tolist() == [1] and d.num_classes == 200
    np.testing.assert_array_equal(d.test_x[0].numpy(), pixels.transpose(2, 0, 1))
    monkeypatch.setattr("kdaudit.data.vision._decode_images", lambda *a: pytest.fail("not cached"))
    again = DATASETS.build(ImageConfig("tinyimagenet", download=False), tmp_path)
    assert torch.equal(again.train_x, d.train_x)


def test_imagenet_class_folders_resized(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("n0001", "n0002"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(
                    _jpeg(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8))
                )
    d = DATASETS.build(FolderImageConfig("imagenet", image_size=16), tmp_path)
    assert d.train_x.shape == (4, 3, 16, 16) and d.num_classes == 2
    assert d.train_y.tolist() == [0, 0, 1, 1] and d.test_y.tolist() == [0, 1]


@pytest.mark.parametrize("name, where", [("fashion_mnist", "fashion-mnist"), ("svhn", "housenumbers"),
                                         ("cifar10", "cifar-10-python"), ("tinyimagenet", "tiny-imagenet")])  # fmt: skip
def test_missing_files_name_the_files_and_where_to_get_them(tmp_path, name, where):
    with pytest.raises(DatasetMissing, match=where) as err:
        DATASETS.build(ImageConfig(name, download=False), tmp_path)
    assert str(tmp_path) in str(err.value) and "--data-dir" in str(err.value)


def test_imagenet_missing_explains_registration(tmp_path):
    with pytest.raises(DatasetMissing, match="registration"):
        DATASETS.build(FolderImageConfig("imagenet"), tmp_path)


def test_damaged_file_is_detected_by_its_checksum(tmp_path):
    write_fashion(tmp_path)
    with pytest.raises(DatasetMissing, match="damaged"):
        DATASETS.build(ImageConfig("fashion_mnist", download=False), tmp_path)


def test_download_verifies_the_checksum_and_renames_into_place(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    good = Resource(
        "ds/file.bin", source.as_uri(), sha256=hashlib.sha256(source.read_bytes()).hexdigest()
    )
    (path,) = ensure(tmp_path / "data", [good], "ds", "")
    assert path.read_bytes() == source.read_bytes()
    bad = Resource("ds/other.bin", source.as_uri(), sha256="0" * 64)
    with pytest.raises(DatasetMissing, match="wrong checksum"):
        fetch(bad, tmp_path / "data" / "ds" / "other.bin")
    assert not list((tmp_path / "data" / "ds").glob(".*part*"))


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg19", "vgg19_bn", "vit", "cnn", "mlp"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32)])  # VGG needs >= 32x32
def test_image_models_forward_and_backward(name, shape):
    cfg = MODELS.get(name).config()
    if name == "vit":
        cfg = type(cfg)(depth=1, width=32, mlp_dim=64, heads=2)
    model = build_model(cfg, shape, 7, init_seed=0)
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- augmentation


def test_crop_flip_is_seeded_and_per_image():
    x = torch.from_numpy(_images(8, 3, 8, 8))
    torch.manual_seed(3)
    a = crop_flip(x)
    torch.manual_seed(3)
    assert torch.equal(a, crop_flip(x)) and a.dtype == torch.uint8 and a.shape == x.shape
    no_shift = crop_flip(x, pad=0)  # only flips remain
    for img, out in zip(x, no_shift, strict=True):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
    shifted = crop_flip(torch.ones(1, 1, 4, 4, dtype=torch.uint8), pad=4)
    assert shifted.sum() <= 16  # zero padding enters the crop


def test_randaugment_runs_per_image_on_uint8():
    x = torch.from_numpy(_images(4, 3, 16, 16))
    torch.manual_seed(0)
    out = randaugment(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        randaugment(x.float())


@pytest.fixture
def fashion_config(tmp_path, no_checksums):
    write_fashion(tmp_path / "data")
    return write_config(
        tmp_path,
        data={"name": "fashion_mnist", "download": False},
        model={"name": "cnn", "width": 4, "depth": 1},
        train={"batch_size": 16, "epochs": 1, "lr": 0.01, "augment": "crop_flip"},
        protocol={"alphas": [0.0], "conditions": ["siddo", "kd", "rcd"]},
    ), tmp_path / "data"


def test_augmented_grid_is_paired_and_kd_uses_the_teacher_model(fashion_config, tmp_path):
    """alpha = 0 KD/RCD reproduce SIDDO bit for bit under augmentation: the augmentation
    draws are paired; KD with augmentation runs the stored teacher on each batch."""
    path, data_dir = fashion_config
    cfg = load_config(path)
    out = tmp_path / "out"
    # workers=1: in this process, where no_checksums lets the fake files through
    assert not run_local(cfg, out, "cpu", data_dir, workers=1).failed
    store, grid = RunStore(out), expand(cfg)
    assert (out / "runs" / grid.teachers[0].run_id / "weights.safetensors").is_file()
    for seed in (10, 11):
        logits = {s.condition: np.asarray(store.array(s.run_id, "test_logits"))
                  for s in grid.students if s.student_seed == seed}  # fmt: skip
        np.testing.assert_array_equal(logits["kd"], logits["siddo"])
        np.testing.assert_array_equal(logits["rcd"], logits["siddo"])
    cfg_kd = load_config(path, ["protocol.alphas=[0.9]", "protocol.conditions=[kd]"])
    assert not run_local(cfg_kd, out, "cpu", data_dir, workers=1).failed
