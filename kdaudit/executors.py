"""Executors run a grid of paired runs into a store. `local` runs them one by one here."""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from kdaudit.config import ExperimentConfig
from kdaudit.data import load_data
from kdaudit.progress import NullReporter, Reporter
from kdaudit.protocol import Grid, RunSpec, expand
from kdaudit.runner import TeacherOutputs, execute
from kdaudit.store import RunStore
from kdaudit.train import total_steps


@dataclass(frozen=True)
class GridOutcome:
    total: int
    skipped: int  # complete before this call
    completed: int  # completed by this call
    failed: tuple[str, ...]  # run ids that failed (now or before, when not retried)
    blocked: int = 0  # students not run because their teacher is not complete


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was asked for, but torch sees no CUDA GPU; use cpu or auto"
        )
    return torch.device(name)


def run_local(
    cfg: ExperimentConfig,
    out: str | Path,
    device: str = "auto",
    data_dir: str | Path | None = None,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
) -> GridOutcome:
    """Run every run of `cfg`'s grid that `out` does not hold yet, sequentially."""
    reporter = reporter or NullReporter()
    store = RunStore(out)
    store.save_experiment(cfg)
    store.clean_temporary()
    grid = expand(cfg)
    todo = [r for r in grid.runs if _todo(store, r, retry_failed)]
    skipped = sum(store.is_complete(r.run_id) for r in grid.runs)
    reporter.start_grid(len(grid.runs), skipped, len(todo))
    if todo:
        _run_all(cfg, grid, todo, store, resolve_device(device), data_dir, reporter)
    reporter.end_grid()
    failed = tuple(r.run_id for r in grid.runs if store.failure(r.run_id))
    completed = sum(store.is_complete(r.run_id) for r in grid.runs) - skipped
    blocked = sum(_state(store, r) == "blocked" for r in grid.runs)
    return GridOutcome(len(grid.runs), skipped, completed, failed, blocked)


def _todo(store: RunStore, spec: RunSpec, retry_failed: bool) -> bool:
    if store.is_complete(spec.run_id):
        return False
    return retry_failed or store.failure(spec.run_id) is None


def _run_all(cfg, grid: Grid, todo, store: RunStore, device, data_dir, reporter: Reporter) -> None:
    data = load_data(cfg.data, Path(data_dir) if data_dir else None).to(device)
    teachers = TeacherOutputs(store, device)
    for spec in todo:
        if not spec.is_teacher and not store.is_complete(spec.teacher_id):
            # Not a failure of this run: it stays pending and runs once its teacher exists.
            reporter.end_run(spec, f"skipped: its teacher {spec.teacher_id} did not complete")
            continue
        reporter.start_run(spec, total_steps(data.n_train, spec.train))
        try:
            execute(spec, data, store, teachers, cfg.store.save_weights, reporter.step)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # a failed run costs only itself: record it, go on
            _fail(store, spec, f"{type(err).__name__}: {err}", getattr(err, "step", None), reporter)
            continue
        reporter.end_run(spec, "complete")


def _fail(store: RunStore, spec: RunSpec, error: str, step, reporter: Reporter) -> None:
    """Record a run that raised (called inside the except block: the traceback is its own)."""
    store.write_failure(spec, error, traceback.format_exc(), step)
    reporter.end_run(spec, f"failed: {error}")


def grid_status(out: str | Path) -> dict:
    """Complete / failed / pending counts, overall and per condition, of the grid in `out`."""
    store = RunStore(out)
    grid = expand(store.load_experiment())
    counts: dict[str, Counter] = {}
    failures = []
    for spec in grid.runs:
        state = _state(store, spec)
        counts.setdefault(spec.condition, Counter())[state] += 1
        if state == "failed":
            failures.append({"run_id": spec.run_id, **_brief(store.failure(spec.run_id))})
    total = sum(counts.values(), Counter())
    per_condition = {c: _counts(n) for c, n in counts.items()}
    return {
        "total": len(grid.runs),
        **_counts(total),
        "conditions": per_condition,
        "failed_runs": failures,
    }


def _state(store: RunStore, spec: RunSpec) -> str:
    if store.is_complete(spec.run_id):
        return "complete"
    if store.failure(spec.run_id):
        return "failed"
    if not spec.is_teacher and store.failure(spec.teacher_id):
        return "blocked"  # pending, waiting for a teacher that failed
    return "pending"


def _counts(c: Counter) -> dict[str, int]:
    return {k: c.get(k, 0) for k in ("complete", "failed", "blocked", "pending")}


def _brief(failure: dict) -> dict:
    return {"error": failure.get("error"), "step": failure.get("step")}
