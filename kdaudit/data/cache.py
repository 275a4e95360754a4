"""The one place where kdaudit keeps what it derives from datasets (generated MNIST-1D arrays,
log-mel features, decoded images): a cache directory, never the data directory, so that a
read-only or shared data directory works and is left exactly as it was.

The cache directory is $KDAUDIT_CACHE, else ~/.cache/kdaudit. Each entry is keyed by what
determines it (the files' names and sizes, the settings), not by where the data lies: the
same files elsewhere reuse it. Entries are written to a temporary name and renamed into place,
so a concurrent reader sees a whole file or none; a cache that cannot be written is a warning
and the arrays are recomputed next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def cache_dir() -> Path:
    """$KDAUDIT_CACHE, else ~/.cache/kdaudit."""
    return Path(os.environ.get("KDAUDIT_CACHE") or Path.home() / ".cache" / "kdaudit")


def use_cache_dir(path: str | Path) -> None:
    """Keep the cache in `path` from now on, in this process and the workers it starts
    (they inherit the environment)."""
    os.environ["KDAUDIT_CACHE"] = str(Path(path).expanduser().resolve())


def key_of(facts: Any, length: int = 16) -> str:
    """A short hash of JSON-able facts."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:length]


def cached_arrays(kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]]):
    """The arrays `compute()` returns (a dict of name -> array), read from
    CACHE/kind/key.npz when present, else computed and kept there."""
    path = cache_dir() / kind / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    arrays = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(f"cannot keep {kind} in the cache at {path} ({err}); they are computed "
                      "again next time (set $KDAUDIT_CACHE to a writable folder)",
                      stacklevel=2)  # fmt: skip
    return arrays
