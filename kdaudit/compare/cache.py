"""Per-row metrics cached in the output folder, so a rerun only computes what changed.

An entry is keyed by everything its numbers depend on: each input file's resolved path,
size and modification time (ns), the settings that change results, and kdaudit's version.
A file rewritten in place gets a new mtime and is recomputed; a moved file is recomputed
too. Only a file's metadata is checked, never its content: a tool that rewrites a file and
restores its size and mtime defeats the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kdaudit import __version__

FORMAT = 1  # bump when the cached numbers change meaning


def file_id(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class MetricsCache:
    """A JSON file of {key: metrics}; rewritten atomically after every new entry."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = self._load()

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # absent or unreadable: start afresh
        return data.get("entries", {}) if data.get("format") == FORMAT else {}

    @staticmethod
    def key(files: list[Path], **settings) -> str:
        blob = {"files": [file_id(p) for p in files], "kdaudit": __version__, **settings}
        blob = json.dumps(blob, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, metrics: dict) -> None:
        self.entries[key] = metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        # NaN (an empty agreement subset, Procrustes above its K limit) round-trips as NaN.
        tmp.write_text(json.dumps({"format": FORMAT, "entries": self.entries}), encoding="utf-8")
        os.replace(tmp, self.path)
