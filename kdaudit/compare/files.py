"""Logits and labels files, read a block of rows at a time with bounded memory.

Every format resolves, where it can, to one C-order array at a byte offset of a file, which
`StoredArray` memory-maps and reads block by block (the labels file: `labels` for `logits`):

    .npy                      the array after its header
    .npz (stored, np.savez)   the member `logits` (or the only one), via its zip offset
    .safetensors              the tensor `logits` (or the only one), via the JSON header
    .pt (torch.save)          a tensor, or a dict's `logits`, via its zip storage record

A top-k file (.npz or .safetensors) holds `topk_ids` (..., k) integer, `topk_logprobs`
(..., k) float (natural log, any order within the last axis) and the scalar `vocab_size`
instead of `logits`; `open_logits` opens either kind (kdaudit.metrics.topk defines the
metrics of top-k inputs).

After each block the pages it touched are released from this process (MADV_DONTNEED): they
stay in the OS page cache, so rereading is fast, but the resident set stays at about one
block however large the file (a plain mmap would keep every page read mapped, and a 2.6 GB
file read once would count 2.6 GB). Two cases fall back:

- a compressed .npz member (np.savez_compressed) is decompressed sequentially, block by
  block (bounded memory; reading rows out of order restarts the decompression);
- a .pt whose tensor is not the file's only storage is read through torch.load(mmap=True):
  chunked, but its mapped pages are not released (resident memory grows with the part of
  the file read, up to the file size); a non-contiguous tensor is copied into memory.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from kdaudit.compare.errors import CompareError
from kdaudit.metrics.topk import TopK

FORMATS = (".npy", ".npz", ".pt", ".safetensors")

# safetensors dtype -> numpy storage dtype; BF16 is read as raw 16-bit words (numpy has no
# bfloat16) and reinterpreted by torch.
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
}  # fmt: skip
_TORCH_TO_NUMPY = {
    torch.float64: "<f8", torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<u2",
    torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2", torch.int8: "i1",
    torch.uint8: "u1",
}  # fmt: skip
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


class StoredArray:
    """A C-order array stored at byte `offset` of `path`, read through mmap.

    `read(start, stop)` gives rows [start, stop) of the (prod(shape[:-1]), shape[-1])
    flattening; `load()` the whole array. Both return tensors that own their memory.
    """

    def __init__(self, path: Path, offset: int, shape, np_dtype, torch_dtype=None):
        self.path, self.offset, self.shape = Path(path), offset, tuple(int(d) for d in shape)
        self.np_dtype = np.dtype(np_dtype)
        self.dtype = torch_dtype or torch.from_numpy(np.zeros(0, self.native)).dtype
        self._file = self._map = None

    @property
    def native(self) -> np.dtype:
        return self.np_dtype.newbyteorder("=")

    def read(self, start: int, stop: int) -> torch.Tensor:
        k = self.shape[-1]
        stop = min(stop, math.prod(self.shape[:-1]))
        return self._elements(start * k, max(stop - start, 0) * k).reshape(-1, k)

    def load(self) -> torch.Tensor:
        return self._elements(0, math.prod(self.shape)).reshape(self.shape)

    def _elements(self, first: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.zeros(0, dtype=self.dtype)
        mapped = self._mapped()
        lo = self.offset + first * self.np_dtype.itemsize
        block = np.frombuffer(mapped, self.np_dtype, count=count, offset=lo)
        out = torch.from_numpy(block.astype(self.native))  # a copy, in native byte order
        del block  # the mmap cannot be closed while a view exports its buffer
        _release(mapped, lo, lo + count * self.np_dtype.itemsize)
        return out.view(self.dtype) if out.dtype != self.dtype else out

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._file.close()
            self._map = self._file = None


def _release(mapped: mmap.mmap, lo: int, hi: int) -> None:
    """Unmap the whole pages in [lo, hi) from this process; the page cache keeps them."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # e.g. Windows: pages stay mapped
        return
    page = mmap.PAGESIZE
    begin, end = lo // page * page, hi // page * page  # the last partial page goes next time
    if end > begin:
        mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class ZipStreamArray(StoredArray):
    """A compressed .npz member, decompressed sequentially (rewinding restarts)."""

    def __init__(self, path: Path, member: str, header_len: int, shape, np_dtype):
        super().__init__(path, 0, shape, np_dtype)
        self.member, self.header_len = member, header_len
        self._zip = self._stream = None
        self._position = 0  # next element the stream yields

    def _elements(self, first: int, count: int) -> torch.Tensor:
        if self._stream is None or first < self._position:
            self._restart()
        size = self.np_dtype.itemsize
        while self._position < first:  # skip forward in blocks of at most 64 MiB
            step = min(first - self._position, (64 << 20) // size)
            self._stream.read(step * size)
            self._position += step
        data = self._stream.read(count * size)
        self._position += count
        return torch.from_numpy(np.frombuffer(data, self.np_dtype).astype(self.native))

    def _restart(self) -> None:
        self.close()
        self._zip = zipfile.ZipFile(self.path)
        self._stream = self._zip.open(self.member)
        self._stream.read(self.header_len)
        self._position = 0

    def close(self) -> None:
        if self._zip is not None:
            self._stream.close()
            self._zip.close()
            self._zip = self._stream = None


class TensorArray:
    """A tensor already in (mapped) memory, with the same read/load interface."""

    def __init__(self, path: Path, tensor: torch.Tensor):
        self.path, self.tensor = Path(path), tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.reshape(-1, self.shape[-1])[start:stop].clone()

    def load(self) -> torch.Tensor:
        return self.tensor.clone()

    def close(self) -> None:
        pass


ArrayFile = StoredArray | TensorArray
TOPK_KEYS = ("topk_ids", "topk_logprobs", "vocab_size")


class TopkFile:
    """A top-k file's `topk_ids` and `topk_logprobs` arrays, opened without reading their
    data, and its `vocab_size`; `shape` is that of the arrays, (..., k)."""

    def __init__(self, path: Path, ids: ArrayFile, logprobs: ArrayFile, vocab_size: int):
        self.path, self.ids, self.logprobs, self.vocab_size = path, ids, logprobs, vocab_size
        self.shape, self.dtype = logprobs.shape, logprobs.dtype

    @property
    def k(self) -> int:
        return self.shape[-1]

    def as_input(self) -> TopK:
        """The kdaudit.metrics input (the arrays are read chunk by chunk from it)."""
        return TopK(self.ids, self.logprobs, self.vocab_size)

    def close(self) -> None:
        self.ids.close()
        self.logprobs.close()


def open_logits(path: str | Path) -> ArrayFile | TopkFile:
    """A logits file's `logits` array, or a top-k file (one holding `topk_ids`)."""
    path = Path(path)
    names = array_names(path)
    if "topk_ids" not in names:
        return open_array(path)
    missing = [key for key in TOPK_KEYS if key not in names]
    if missing:
        raise CompareError(f"{path}: holds topk_ids but not {', '.join(missing)}; a top-k file "
                           f"needs {', '.join(TOPK_KEYS)}")  # fmt: skip
    vocab = open_array(path, "vocab_size")
    try:
        value = vocab.load()
    finally:
        vocab.close()
    if value.numel() != 1 or value.dtype.is_floating_point or int(value.reshape(-1)[0]) < 2:
        raise CompareError(f"{path}: vocab_size must be one integer >= 2 (the number of "
                           f"classes), got {value.tolist()}")  # fmt: skip
    ids, logprobs = open_array(path, "topk_ids"), open_array(path, "topk_logprobs")
    return TopkFile(path, ids, logprobs, int(value.reshape(-1)[0]))


def array_names(path: Path) -> list[str]:
    """The arrays an .npz or .safetensors file holds (others: none named)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
        if suffix == ".safetensors":
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                return [k for k in json.loads(f.read(header_len)) if k != "__metadata__"]
    except (OSError, ValueError, struct.error, zipfile.BadZipFile):
        return []  # open_array reports the unreadable file
    return []


def open_array(path: str | Path, key: str = "logits") -> ArrayFile:
    """Open a logits or labels file without reading its data; CompareError if unreadable.

    A file holding several arrays (.npz, .safetensors, a dict in .pt) must name one `key`.
    """
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"file not found: {path}")
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        raise CompareError(
            f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    try:
        return opener(path, key)
    except CompareError:
        raise
    except Exception as err:  # corrupt or foreign files fail in many library-specific ways
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CompareError(f"{path}: cannot read as {path.suffix} ({message})") from err


def _open_npy(path: Path, key: str) -> StoredArray:
    with open(path, "rb") as f:
        shape, dtype, header_len = _npy_header(f, path)
    return StoredArray(path, header_len, shape, dtype)


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes up to the data) of the .npy stream at f's position."""
    version = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read(f)
    if fortran_order and len(shape) > 1:
        raise CompareError(f"{path}: array is in Fortran order; save a C-order array")
    if dtype.hasobject:
        raise CompareError(f"{path}: array holds Python objects; save a numeric array")
    return shape, dtype, f.tell()


def _open_npz(path: Path, key: str) -> StoredArray:
    with zipfile.ZipFile(path) as archive:
        names = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
        member = archive.getinfo(names[_pick(sorted(names), key, path)])
        with archive.open(member) as stream:
            shape, dtype, header_len = _npy_header(stream, path)
    if member.compress_type != zipfile.ZIP_STORED:
        return ZipStreamArray(path, member.filename, header_len, shape, dtype)
    return StoredArray(path, _zip_data_offset(path, member) + header_len, shape, dtype)


def _zip_data_offset(path: Path, member: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header, name and extra."""
    with open(path, "rb") as f:
        f.seek(member.header_offset)
        signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(f.read(30))
    if signature != b"PK\x03\x04":
        raise CompareError(f"{path}: corrupt zip local header for {member.filename}")
    return member.header_offset + 30 + name_len + extra_len


def _open_safetensors(path: Path, key: str) -> StoredArray:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    info = tensors[_pick(sorted(tensors), key, path)]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise CompareError(f"{path}: unsupported dtype {info['dtype']}")
    torch_dtype = torch.bfloat16 if info["dtype"] == "BF16" else None
    begin, end = info["data_offsets"]
    array = StoredArray(
        path, 8 + header_len + begin, info["shape"], _SAFETENSORS_DTYPES[info["dtype"]], torch_dtype
    )
    if end - begin != math.prod(array.shape) * array.np_dtype.itemsize:
        raise CompareError(f"{path}: tensor byte range does not match its shape and dtype")
    return array


def _open_pt(path: Path, key: str) -> ArrayFile:
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if isinstance(obj, dict):
        names = sorted(k for k, v in obj.items() if isinstance(v, torch.Tensor))
        obj = obj[_pick(names, key, path)]
    if not isinstance(obj, torch.Tensor):
        raise CompareError(f"{path}: holds a {type(obj).__name__}; save a tensor")
    offset = _pt_data_offset(path, obj)
    if offset is None:
        return TensorArray(path, obj.contiguous())  # a copy in memory if not contiguous
    return StoredArray(path, offset, obj.shape, _TORCH_TO_NUMPY[obj.dtype], obj.dtype)


def _pt_data_offset(path: Path, tensor: torch.Tensor) -> int | None:
    """File offset of the tensor's data when it is the file's only storage record."""
    if not tensor.is_contiguous() or tensor.dtype not in _TORCH_TO_NUMPY:
        return None
    with zipfile.ZipFile(path) as archive:
        records = [m for m in archive.infolist() if re.fullmatch(r"[^/]+/data/\d+", m.filename)]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    if records[0].file_size != tensor.untyped_storage().nbytes():
        return None
    return _zip_data_offset(path, records[0]) + tensor.storage_offset() * tensor.element_size()


def _pick(names: list[str], key: str, path: Path) -> str:
    """The array called `key`, else the only one."""
    if key in names:
        return key
    if len(names) == 1:
        return names[0]
    found = ", ".join(names) or "none"
    raise CompareError(f"{path}: holds arrays [{found}]; name the one to use {key!r}")


_OPENERS = {
    ".npy": _open_npy,
    ".npz": _open_npz,
    ".safetensors": _open_safetensors,
    ".pt": _open_pt,
}
