"""The state of a grid in a run directory: complete, failed, blocked, pending, per condition."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from kdaudit.protocol import RunSpec, expand
from kdaudit.store import RunStore

STATES = ("complete", "failed", "blocked", "pending")


def grid_status(out: str | Path) -> dict:
    """Counts overall and per condition, the failed runs with their errors, damaged run
    directories (redone by the next `kdaudit run`), and the `kdaudit run` at work, if any."""
    store = RunStore(out)
    grid = expand(store.load_experiment())
    damaged = _damaged(store, grid.runs)
    counts: dict[str, Counter] = {}
    failures = []
    for spec in grid.runs:
        state = run_state(store, spec, damaged)
        counts.setdefault(spec.condition, Counter())[state] += 1
        if state == "failed":
            failures.append({"run_id": spec.run_id, **_brief(store.failure(spec.run_id))})
    total = sum(counts.values(), Counter())
    return {
        "total": len(grid.runs),
        **_counts(total),
        "conditions": {c: _counts(n) for c, n in counts.items()},
        "failed_runs": failures,
        "corrupt_runs": [{"run_id": r, "problem": p} for r, p in damaged.items()],
        "in_progress": _in_progress(store),
    }


def run_state(store: RunStore, spec: RunSpec, damaged: dict | None = None) -> str:
    if store.is_complete(spec.run_id) and spec.run_id not in (damaged or {}):
        return "complete"
    if store.failure(spec.run_id):
        return "failed"
    if not spec.is_teacher and store.failure(spec.teacher_id):
        return "blocked"  # pending, waiting for a teacher that failed
    return "pending"


def _damaged(store: RunStore, runs) -> dict[str, str]:
    problems = {s.run_id: store.verify(s.run_id) for s in runs if store.is_complete(s.run_id)}
    return {run_id: p for run_id, p in problems.items() if p}


def _in_progress(store: RunStore) -> dict | None:
    holder = store.lock_holder()
    if holder is None:
        return None  # in-flight marks without a lock holder are stale: nobody is running
    return {**holder, "runs_in_flight": sorted(store.running())}


def _counts(c: Counter) -> dict[str, int]:
    return {k: c.get(k, 0) for k in STATES}


def _brief(failure: dict) -> dict:
    return {"error": failure.get("error"), "step": failure.get("step"),
            "kind": failure.get("kind", "error")}  # fmt: skip
