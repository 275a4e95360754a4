"""The output file, written window by window and resumable after a kill.

While scoring, the arrays live in FILE.partial/ as .npy files of their final shape, written
with plain positioned writes (a full disk is an OSError, not a crash), and
FILE.partial/progress.json says how many batches are on disk (written after an fsync of
the arrays). A rerun with the same settings continues at the next batch; other settings are
refused. At the end the arrays become FILE (full logits: the .npy renamed; top-k: an
uncompressed .npz holding `topk_ids`, `topk_logprobs` and `vocab_size`), the sidecar
FILE.kdaudit.json is written first, and FILE.partial/ is removed.

Row-major (N, P, ...) arrays keep the positions a window scores, [first, last) of one
sequence, contiguous: each window is one write.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np

from kdaudit.hf import LogitsError
from kdaudit.hf.identity import sidecar_path

PROGRESS = "progress.json"
IDS_DTYPE = np.int32  # top-k ids: every vocabulary in use fits; half the bytes of int64


class Output:
    def __init__(self, path: Path, sequences: int, positions: int, vocab_size: int,
                 top_k: int | None, key: dict):  # fmt: skip
        self.path, self.key, self.top_k = Path(path), key, top_k
        self.partial = self.path.with_name(self.path.name + ".partial")
        width = top_k or vocab_size
        if top_k is None:
            self.arrays = {"logits": np.dtype(np.float32)}
        else:
            self.arrays = {"topk_ids": np.dtype(IDS_DTYPE), "topk_logprobs": np.dtype(np.float32)}
        self.shape = (sequences, positions, width)
        self.vocab_size = vocab_size
        self._files: dict[str, tuple[int, int]] = {}  # name -> (fd, header bytes)

    @property
    def nbytes(self) -> int:
        n = self.shape[0] * self.shape[1] * self.shape[2]
        return sum(n * dtype.itemsize for dtype in self.arrays.values())

    def is_complete(self) -> bool:
        """FILE exists and was written by this command with these settings."""
        if not self.path.exists():
            return False
        side = sidecar_path(self.path)
        record = json.loads(side.read_text()) if side.is_file() else {}
        if record.get("key") != self.key:
            raise LogitsError(f"{self.path} exists and was not written with these settings "
                              "(model, corpus, context, stride, top-k, batch size, device); "
                              "delete it or choose another --out")  # fmt: skip
        return True

    def open(self) -> int:
        """Open (or resume) FILE.partial/; returns the batches already on disk."""
        done = self._resumed()
        if done == 0:
            self._create()
        for name in self.arrays:
            fd = os.open(self.partial / f"{name}.npy", os.O_RDWR)
            self._files[name] = (fd, _header_bytes(self.partial / f"{name}.npy"))
        return done

    def _resumed(self) -> int:
        progress = self.partial / PROGRESS
        if not progress.is_file():
            return 0
        state = json.loads(progress.read_text())
        if state["key"] != self.key:
            differ = sorted(k for k in self.key if state["key"].get(k) != self.key[k])
            raise LogitsError(f"{self.partial} is a run with other settings ({', '.join(differ)} "
                              "differ): rerun with the same ones to resume, or delete it to "
                              "start over")  # fmt: skip
        return int(state["batches"])

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path.parent).free
        if self.nbytes > free:
            raise LogitsError(f"{self.path} needs {self.nbytes / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                              f"are free in {self.path.parent}; free space, choose another "
                              "--out or store --top-k K log-probabilities")  # fmt: skip
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        for name, dtype in self.arrays.items():
            array = np.lib.format.open_memmap(self.partial / f"{name}.npy", "w+", dtype,
                                              self.shape)  # fmt: skip
            del array  # only the header and the file's size: the data is written with pwrite
        self.commit(0)

    def write(self, sequence: int, first: int, values: dict[str, np.ndarray]) -> None:
        """Rows [first, first + len) of sequence `sequence`: each array (m, width)."""
        for name, block in values.items():
            fd, header = self._files[name]
            dtype = self.arrays[name]
            block = np.ascontiguousarray(block, dtype=dtype)
            row = sequence * self.shape[1] + first
            offset = header + row * self.shape[2] * dtype.itemsize
            view = memoryview(block).cast("B")
            while view:  # pwrite may write less than asked
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n

    def commit(self, batches: int) -> None:
        """The arrays up to `batches` batches are on disk: fsync, then say so."""
        for fd, _ in self._files.values():
            os.fsync(fd)
        _atomic_json(self.partial / PROGRESS, {"key": self.key, "batches": batches})

    def finish(self, sidecar: dict) -> None:
        """FILE from the arrays; the sidecar first (a crash in between reruns `finish`)."""
        self.close()
        _atomic_json(sidecar_path(self.path), {**sidecar, "key": self.key})
        if self.top_k is None:
            os.replace(self.partial / "logits.npy", self.path)
        else:
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name in self.arrays:
                    with open(self.partial / f"{name}.npy", "rb") as src:
                        _member(z, f"{name}.npy", src)
                vocab = io.BytesIO()
                np.save(vocab, np.asarray(self.vocab_size, np.int64))
                _member(z, "vocab_size.npy", io.BytesIO(vocab.getvalue()))
            os.replace(tmp, self.path)
        shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files = {}


def _header_bytes(path: Path) -> int:
    return np.load(path, mmap_mode="r").offset  # where the data starts


def _member(z: zipfile.ZipFile, name: str, src) -> None:
    """One stored (uncompressed) member, as np.savez writes it, with a fixed timestamp so
    that the same arrays give the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    with z.open(info, "w", force_zip64=True) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
