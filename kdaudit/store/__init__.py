"""Run records on disk. A run directory is either complete or absent.

    DIR/experiment.yaml          the resolved experiment config of the latest `kdaudit run`
    DIR/runs/<run_id>/           one complete run:
        spec.json                the resolved run config (its hash is in run_id)
        record.json              metrics, similarity to the teacher, timings, versions, and
                                 `files`: the byte size and sha256 of every other file
        test_logits.npy          (N_test, K) fp32
        train_logits.npy         (N_train, K) fp32, teachers only (the students' KD targets)
        students_test_logits.npy (N_test, K) fp32, a teacher trained on other data than its
                                 students (protocol.teacher_data): its outputs on theirs
        weights.safetensors      optional
    DIR/failed/<run_id>.json     a run that raised or whose worker kept dying: error, step
    DIR/running/<run_id>.json    a run in flight: the pid and host of the process running it
    DIR/corrupt/<run_id>-<time>/ a run directory found damaged, moved aside (never deleted)
    DIR/.lock                    held (flock) by the one `kdaudit run` working on DIR

A run is written into DIR/runs/.tmp-*, then renamed into place in one step, so a crash or
kill -9 can leave only a temporary directory, which the next start removes. Damage from
outside (a truncated or deleted file) is caught at the next start by `recover`, which
checks every run's files against the sizes its record lists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from kdaudit.config import ExperimentConfig, dump_yaml, from_dict
from kdaudit.protocol import RunSpec

RECORD = "record.json"
# a teacher trained on other data than its students: its test logits on their data
STUDENTS_TEST_LOGITS = "students_test_logits"


class StoreLocked(RuntimeError):
    """Another `kdaudit run` holds the run directory."""


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.failed = self.root / "failed"
        self.in_flight = self.root / "running"
        self.corrupt = self.root / "corrupt"

    # ------------------------------------------------------------ experiment
    def save_experiment(self, cfg: ExperimentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / "experiment.yaml", dump_yaml(cfg))

    def load_experiment(self) -> ExperimentConfig:
        import yaml

        path = self.root / "experiment.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.root} holds no experiment.yaml: is it the --out directory of `kdaudit run`?"
            )
        return from_dict(ExperimentConfig, yaml.safe_load(path.read_text()))

    # ------------------------------------------------------------ queries
    def is_complete(self, run_id: str) -> bool:
        return (self.runs / run_id / RECORD).is_file()

    def failure(self, run_id: str) -> dict | None:
        path = self.failed / f"{run_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record(self, run_id: str) -> dict:
        return json.loads((self.runs / run_id / RECORD).read_text())

    def spec(self, run_id: str) -> dict:
        """The resolved run config a complete run was made from (its spec.json)."""
        return json.loads((self.runs / run_id / "spec.json").read_text())

    def array(self, run_id: str, name: str) -> np.ndarray:
        """A stored array, memory-mapped (read-only)."""
        return np.load(self.runs / run_id / f"{name}.npy", mmap_mode="r")

    def has_array(self, run_id: str, name: str) -> bool:
        return (self.runs / run_id / f"{name}.npy").is_file()

    def verify(self, run_id: str, checksums: bool = False) -> str | None:
        """What is wrong with a complete run's directory, or None when it is intact.
        Sizes only by default (a few stat calls); `checksums` also hashes every file."""
        return _damage(self.runs / run_id, checksums)

    # ------------------------------------------------------------ writing
    def write(
        self,
        spec: RunSpec,
        record: dict[str, Any],
        arrays: dict[str, np.ndarray],
        weights: dict | None = None,
    ) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        tmp = self.runs / f".tmp-{spec.run_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        final = self.runs / spec.run_id
        try:
            _write_json(tmp / "spec.json", spec.to_dict())
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            if weights is not None:
                from safetensors.torch import save_file

                save_file(weights, tmp / "weights.safetensors")
            files = _manifest(tmp)
            _write_json(tmp / RECORD, {"run_id": spec.run_id, "status": "complete", **record,
                                       "files": files})  # fmt: skip
            _fsync_dir(tmp)
            if not self._rename_into_place(tmp, final):
                return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (self.failed / f"{spec.run_id}.json").unlink(missing_ok=True)
        return final

    def _rename_into_place(self, tmp: Path, final: Path) -> bool:
        """False when another worker (a retried task's first attempt) finished it first:
        the first copy is kept, so a run is never stored twice."""
        if not final.exists():
            try:
                os.rename(tmp, final)
                _fsync_dir_entry(final.parent)  # the rename itself survives a power cut
                return True
            except OSError:
                if not final.exists():
                    raise
        shutil.rmtree(tmp)
        return False

    def write_failure(
        self, spec: RunSpec, error: str, traceback: str, step: int | None, kind: str = "error"
    ) -> None:
        """kind: 'error' (the run raised; not retried) or 'system' (its worker kept dying)."""
        self.failed.mkdir(parents=True, exist_ok=True)
        record = {"run_id": spec.run_id, "status": "failed", "kind": kind, "error": error,
                  "step": step, "traceback": traceback, **_whereabouts(),
                  "spec": spec.to_dict()}  # fmt: skip
        _atomic_write_text(self.failed / f"{spec.run_id}.json", _json(record))

    # ------------------------------------------------------------ runs in flight
    def mark_running(self, run_id: str) -> None:
        self.in_flight.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.in_flight / f"{run_id}.json", _json(_whereabouts()))

    def is_running(self, run_id: str) -> bool:
        """Whether the run's in-flight mark is there and its process may still be running:
        a mark left by a process of this host that no longer exists (killed with kill -9, or
        with its driver) is stale, not a run in flight."""
        try:
            mark = json.loads((self.in_flight / f"{run_id}.json").read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True  # being replaced right now
        if mark.get("host") != socket.gethostname() or not isinstance(mark.get("pid"), int):
            return True  # another machine's process: only its own host can tell
        return process_exists(mark["pid"])

    def clear_running(self, run_id: str) -> None:
        (self.in_flight / f"{run_id}.json").unlink(missing_ok=True)

    def running(self) -> dict[str, dict]:
        """Runs some process has started and not finished: run id -> its pid, host, start."""
        found = {}
        for path in self.in_flight.glob("*.json") if self.in_flight.is_dir() else ():
            try:
                found[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # removed or being replaced meanwhile
        return found

    # ------------------------------------------------------------ recovery
    def clean_temporary(self) -> int:
        """Remove what runs in flight left behind when their process died (only while
        holding the lock, with no run in flight)."""
        stale = list(self.runs.glob(".tmp-*")) if self.runs.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.in_flight, ignore_errors=True)  # their in-flight marks
        return len(stale)

    def recover(self, checksums: bool = False) -> list[Path]:
        """Start of a grid (under the lock): drop temporary directories and stale in-flight
        marks, and move every damaged run directory or failure record to DIR/corrupt/, so
        that it counts as not done and is redone. Returns where they were moved."""
        self.clean_temporary()
        moved = []
        for path in sorted(self.runs.iterdir()) if self.runs.is_dir() else ():
            if not path.name.startswith(".") and _damage(path, checksums):
                moved.append(self._quarantine(path, path.name))
        for path in sorted(self.failed.glob("*.json")) if self.failed.is_dir() else ():
            if _unreadable_json(path):
                moved.append(self._quarantine(path, path.name))
        return moved

    def _quarantine(self, path: Path, name: str) -> Path:
        self.corrupt.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.corrupt / f"{name}-{stamp}-{uuid.uuid4().hex[:4]}"
        os.rename(path, target)
        return target

    # ------------------------------------------------------------ one writer at a time
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold DIR/.lock (an exclusive flock, released by the kernel even on kill -9) while
        a grid runs, so that two `kdaudit run` on one directory cannot race."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLocked(self._locked_message()) from None
            os.ftruncate(fd, 0)
            os.write(fd, _json({**_whereabouts(), "command": sys.argv}).encode())
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def lock_holder(self) -> dict | None:
        """Who holds DIR/.lock (pid, host, since), or None when no `kdaudit run` does."""
        path = self.root / ".lock"
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            text = path.read_text()
            return json.loads(text) if text and not _unreadable_json(path) else {}
        finally:
            os.close(fd)

    def _locked_message(self) -> str:
        holder = self.lock_holder() or {}
        who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started_at']}"
               if "pid" in holder else "pid unknown")  # fmt: skip
        return (
            f"{self.root} is in use by another `kdaudit run` ({who}). Two runs on one "
            f"directory would race; wait for it to finish (`kdaudit status {self.root}` shows "
            "its progress), or stop it and rerun this command to resume, or pass another --out"
        )


# ---------------------------------------------------------------- integrity


def _manifest(run_dir: Path) -> dict[str, dict]:
    """Byte size and sha256 of every file of a run directory being written."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(run_dir.iterdir())
        if p.name != RECORD
    }


def _damage(run_dir: Path, checksums: bool) -> str | None:
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except FileNotFoundError:
        return f"{RECORD} is missing"
    except (OSError, ValueError) as err:
        return f"{RECORD} is unreadable ({type(err).__name__})"
    if not isinstance(record, dict) or record.get("run_id") != run_dir.name:
        return f"{RECORD} does not describe run {run_dir.name}"
    if "files" not in record:  # written before records listed their files
        return _legacy_damage(run_dir)
    for name, meta in record["files"].items():
        path = run_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, its record says {meta['bytes']}"
        if checksums and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _legacy_damage(run_dir: Path) -> str | None:
    if not (run_dir / "test_logits.npy").is_file():
        return "test_logits.npy is missing"
    for path in run_dir.glob("*.npy"):
        try:  # the header gives shape and dtype; mapping checks the data is all there
            np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            return f"{path.name} is unreadable ({err})"
    return None


def _unreadable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return False
    except (OSError, ValueError):
        return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- helpers


def process_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this host (kill(pid, 0), which signals nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (a reused pid)
        return True
    return True


def _whereabouts() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def _json(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, sort_keys=False)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: store non-finite floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(_json(obj))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """np.save into `path` in one step (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir_entry(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """kdaudit's version and, when run from a git checkout, its commit."""
    from kdaudit import __version__

    commit = ""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )  # fmt: skip
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"kdaudit": __version__, "git_commit": commit}
