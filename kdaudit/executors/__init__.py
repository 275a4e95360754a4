"""Executors run the grid of paired runs into a store; they differ only in where runs execute.
Each is registered by name in `EXECUTORS` (kdaudit.executors.core):

    local             worker processes on this machine, as many as it has cores (CPU, one
                      torch thread each; a student seed's MLP runs as one stack) or GPUs
                      (the default)
    local, workers=N  N worker processes (workers=1: one run at a time, in this process)
    local, stack=N    in this process, N runs at a time trained as one stacked model
    ray               one Ray task per run on a local or existing cluster

Whatever the executor, a grid holds DIR's lock while it runs, first repairs what a crash left
(temporary directories, damaged runs), runs teachers before their students, records a run
that raises as failed and goes on, and gives bit-identical runs for the same config and
`threads` on the same hardware.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from kdaudit.config import ExperimentConfig
from kdaudit.errors import ConfigError
from kdaudit.executors import local, ray_executor  # noqa: F401  (register themselves)
from kdaudit.executors.core import (
    EXECUTORS,
    ExecutorConfig,
    GridOutcome,
    RunContext,
    resolve_device,
)
from kdaudit.executors.progress import NullReporter, Reporter
from kdaudit.protocol import Grid, RunSpec, expand
from kdaudit.store import RunStore, StoreLocked
from kdaudit.store.status import grid_status, run_state

__all__ = ["ExecutorConfig", "GridOutcome", "StoreLocked", "grid_status", "resolve_device",
           "run_grid", "run_local"]  # fmt: skip


def run_grid(
    cfg: ExperimentConfig,
    out: str | Path,
    executor: ExecutorConfig | str = "local",
    device: str = "auto",
    data_dir: str | Path | None = None,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
) -> GridOutcome:
    """Run every run of `cfg`'s grid that `out` does not hold yet."""
    options = ExecutorConfig(executor) if isinstance(executor, str) else executor
    reporter = reporter or NullReporter()
    store, grid = RunStore(out), expand(cfg)
    with store.lock():
        store.save_experiment(cfg)
        quarantined = tuple(str(p) for p in store.recover())
        skipped = sum(store.is_complete(r.run_id) for r in grid.runs)
        todo = [r for r in grid.runs if _todo(store, r, retry_failed)]
        reporter.start_grid(len(grid.runs), skipped, len(todo))
        try:
            if todo:
                ctx = _context(grid, store, options, device, data_dir)
                EXECUTORS.get(options.name).build(todo, ctx, options, reporter)
        finally:
            reporter.end_grid()
            store.clean_temporary()  # what workers killed mid-write left
    return _outcome(store, grid, skipped, quarantined)


def run_local(
    cfg: ExperimentConfig,
    out: str | Path,
    device: str = "auto",
    data_dir: str | Path | None = None,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
    workers: int | None = None,
) -> GridOutcome:
    """`run_grid` with the local executor: `workers` processes (None: the machine's;
    1: one run at a time in this process)."""
    return run_grid(cfg, out, ExecutorConfig("local", workers=workers), device, data_dir,
                    retry_failed, reporter)  # fmt: skip


def _context(
    grid: Grid, store: RunStore, options: ExecutorConfig, device: str, data_dir
) -> RunContext:
    if options.name == "ray":  # the cluster's GPUs, not this machine's, decide
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise ConfigError(f"--device {device!r}: choose one of auto, cpu, cuda")
    else:
        device = str(resolve_device(device))
    return RunContext(
        out=str(store.root.resolve()),  # workers may run in another directory
        device=device,
        threads=options.threads,
        data_dir=str(Path(data_dir).resolve()) if data_dir else None,
        grid_token=uuid.uuid4().hex,
        plan=grid.plan,
    )


def _todo(store: RunStore, spec: RunSpec, retry_failed: bool) -> bool:
    if store.is_complete(spec.run_id):
        return False
    return retry_failed or store.failure(spec.run_id) is None


def _outcome(store: RunStore, grid: Grid, skipped: int, quarantined: tuple) -> GridOutcome:
    failed = tuple(r.run_id for r in grid.runs if store.failure(r.run_id))
    completed = sum(store.is_complete(r.run_id) for r in grid.runs) - skipped
    blocked = sum(run_state(store, r) == "blocked" for r in grid.runs)
    return GridOutcome(len(grid.runs), skipped, completed, failed, blocked, quarantined)
