"""Helpers for the executor and fault-injection tests: store invariants, killers, CLI commands."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from kdaudit.protocol import Grid
from kdaudit.store import RunStore


def cli(config: Path, out: Path, *extra: str) -> list[str]:
    """A `kdaudit run` command line for a child process."""
    return [sys.executable, "-m", "kdaudit.cli", "run", str(config), "--out", str(out),
            "--device", "cpu", *extra]  # fmt: skip


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def intact_runs(out: Path) -> dict[str, int]:
    """Run id -> record.json mtime of every run directory, asserting each one is intact:
    no half-written run may ever look complete."""
    store, found = RunStore(out), {}
    for path in sorted(store.runs.iterdir()) if store.runs.is_dir() else ():
        if path.name.startswith("."):
            continue  # a temporary directory: never read as a run
        assert store.verify(path.name, checksums=True) is None, path.name
        assert json.loads((path / "record.json").read_text())["status"] == "complete"
        assert store.failure(path.name) is None, f"{path.name} is both complete and failed"
        found[path.name] = (path / "record.json").stat().st_mtime_ns
    return found


def assert_same_runs(grid: Grid, a: Path, b: Path) -> None:
    """Bit-identical test logits and equal stored metrics for every run of the grid."""
    sa, sb = RunStore(a), RunStore(b)
    for spec in grid.runs:
        np.testing.assert_array_equal(
            sa.array(spec.run_id, "test_logits"), sb.array(spec.run_id, "test_logits")
        )
        ra, rb = sa.record(spec.run_id), sb.record(spec.run_id)
        assert ra["metrics"] == rb["metrics"] and ra.get("similarity") == rb.get("similarity")


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the process running the first run whose id starts with `prefix`, as
    soon as its in-flight mark appears in DIR/running/; `killed` holds (run id, pid)."""

    def __init__(self, out: Path, prefix: str, timeout: float = 120):
        super().__init__(daemon=True)
        self.marks = Path(out) / "running"
        self.prefix, self.deadline = prefix, time.time() + timeout
        self.killed: list[tuple[str, int]] = []

    def run(self) -> None:
        while not self.killed and time.time() < self.deadline:
            for mark in self.marks.glob(f"{self.prefix}*.json") if self.marks.is_dir() else ():
                try:
                    pid = json.loads(mark.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                assert pid != os.getpid(), "the run is in this process: nothing to kill"
                os.kill(pid, signal.SIGKILL)
                self.killed.append((mark.stem, pid))
                return
            time.sleep(0.005)
