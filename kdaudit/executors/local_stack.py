"""Stacked execution (`--stack N`): runs that share a teacher, data, architecture and training
config train together as one stacked model (kdaudit.engine.stacking), and each is stored on its own,
atomically, as the sequential executor stores it. A crash loses at most the stack in flight.

Reproducibility: on the CPU a model's result in a stack does not depend on the stack's size,
on its position in it or on the other models in it (bitwise; tests/test_stacked.py), so a
grid that resumes with differently formed stacks gives the same runs bit for bit. Stacked
runs differ from runs trained alone by floating-point rounding, which grows over training
like any change of summation order (kdaudit.engine.stacking), so a store keeps one setting.
"""

from __future__ import annotations

import time
import warnings

from kdaudit.conditions import condition
from kdaudit.engine.accel import architecture_key
from kdaudit.engine.loop import NonFiniteLoss, total_steps
from kdaudit.engine.run import build_run, finish_run
from kdaudit.engine.stacking import Member, StackMismatch, train_stacked, unstackable
from kdaudit.engine.teachers import TeacherNotComplete, keeps_weights
from kdaudit.executors.core import (
    RunContext,
    RunResult,
    attempt,
    blocked,
    cpu_threads,
    know_conditions,
    record_failure,
    release_worker_state,
    teacher_ready,
    worker_state,
)
from kdaudit.executors.progress import Reporter
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore


def run_stacked(todo: list[RunSpec], ctx: RunContext, size: int, reporter: Reporter) -> None:
    """The sequential executor, `size` runs at a time where they can stack."""
    try:
        for group in stack_groups(todo, size):
            for spec, result in attempt_stack(group, ctx, reporter):
                reporter.end_run(spec, result.message)
    finally:
        release_worker_state()


def stack_groups(todo: list[RunSpec], size: int) -> list[list[RunSpec]]:
    """Runs that can train together, at most `size` per group. Runs that share a teacher,
    data, architecture and training config stack; within them the runs of one data seed
    (the paired conditions of one student seed, which share batches, dropout masks and the
    teacher's forward pass) stay together in as few stacks as `size` allows, and several
    seeds' runs fill a stack up to `size`. Teachers, whose key has no teacher, come first."""
    groups: dict[tuple, dict[int, list[RunSpec]]] = {}
    for spec in todo:
        key = (spec.teacher_id, spec.data, spec.model, spec.train)
        if not stackable(spec):  # alone, in grid order
            key = (spec.run_id,)
        groups.setdefault(key, {}).setdefault(spec.data_seed, []).append(spec)
    return [stack for seeds in groups.values() for stack in _pack(seeds.values(), size)]


def _pack(by_seed, size: int) -> list[list[RunSpec]]:
    """Each seed's runs in chunks of at most `size`; consecutive chunks share a stack while
    they fit in it."""
    chunks = [runs[i : i + size] for runs in by_seed for i in range(0, len(runs), size)]
    stacks: list[list[RunSpec]] = []
    for chunk in chunks:
        if stacks and len(stacks[-1]) + len(chunk) <= size:
            stacks[-1] = stacks[-1] + chunk
        else:
            stacks.append(list(chunk))
    return stacks


def stackable(spec: RunSpec) -> bool:
    """Loaded teachers are not trained, and feature-map objectives hook their own model and
    train parameters of their own, which a stacked (functional) model cannot carry."""
    return spec.checkpoint is None and not condition(spec.condition).features


def attempt_stack(
    group: list[RunSpec], ctx: RunContext, reporter: Reporter, early: bool = False
) -> list[tuple[RunSpec, RunResult]]:
    """Train and store one group; per run its result (as `attempt` gives it alone).
    `early`: students that train without their teacher, started while it trains (`attempt`)."""
    store = RunStore(ctx.out)
    know_conditions(group)  # a fresh worker process: runs of your own loss
    ready = [s for s in group if early or teacher_ready(store, s)]
    results = [(s, blocked(s)) for s in group if s not in ready]
    if not ready:
        return results
    solo = lambda: results + [(s, attempt(s, ctx, reporter, early)) for s in ready]  # noqa: E731
    if any(s.checkpoint is not None or not stackable(s) for s in ready):
        return solo()
    with cpu_threads(ctx.threads):
        data, teachers = worker_state(ready[0], ctx)
        built = _build(ready, data, teachers)
        if built is None or architecture_key(built[0][0]) in _REFUSED:
            return solo()  # one at a time; `attempt` records a run that cannot be built
        for part in _parts(list(zip(ready, built, strict=True))):
            results += _train_part(part, data, teachers, ctx, reporter, store, early)
    return results


# Architectures whose stacked forward pass did not reproduce the model's own (StackMismatch),
# in this process: their later stacks train one at a time from the start.
_REFUSED: set[str] = set()


def _parts(pairs: list[tuple]) -> list[list[tuple]]:
    """The (spec, (model, objective)) pairs as stacks that can train: one stack, or one per
    data seed for a model that draws random numbers (dropout; kdaudit.engine.stacking.unstackable)."""
    models, seeds = [m for _, (m, _) in pairs], [s.data_seed for s, _ in pairs]
    if unstackable(models, seeds) is None:
        return [pairs]
    by_seed: dict[int, list[tuple]] = {}
    for pair in pairs:
        by_seed.setdefault(pair[0].data_seed, []).append(pair)
    return list(by_seed.values())


def _train_part(part, data, teachers, ctx: RunContext, reporter: Reporter, store: RunStore,
                early: bool):  # fmt: skip
    ready, built = [s for s, _ in part], [b for _, b in part]
    start = time.perf_counter()
    outcomes = _train_group(ready, built, data, teachers, ctx, reporter)
    if outcomes is None:  # the stack as a whole failed (out of memory?): one at a time, each
        return [(s, attempt(s, ctx, reporter, early)) for s in ready]  # as early as the stack
    return [
        (spec, _store(spec, model, outcome, data, store, teachers, ctx, start))
        for spec, (model, _), outcome in zip(ready, built, outcomes, strict=True)
    ]


def _build(ready: list[RunSpec], data, teachers) -> list | None:
    """Each run's (model, objective), or None if one of them cannot be built."""
    try:
        return [build_run(s, data, teachers) for s in ready]
    except Exception:
        return None


def _train_group(ready, built, data, teachers, ctx: RunContext, reporter: Reporter):
    """Per run its TrainResult or NonFiniteLoss; None if the stack itself raised."""
    store = RunStore(ctx.out)
    members = [Member(m, obj, s.data_seed) for s, (m, obj) in zip(ready, built, strict=True)]
    cfg = ready[0].train
    reporter.start_run(ready[0], total_steps(data.n_train, cfg))
    for spec in ready:
        store.mark_running(spec.run_id)
    try:
        return train_stacked(members, data, cfg, reporter.step)[: len(ready)]
    except (KeyboardInterrupt, SystemExit):
        raise
    except StackMismatch as err:
        _REFUSED.add(architecture_key(members[0].model))
        warnings.warn(f"{err}; its runs train one at a time", stacklevel=1)
        return None
    except Exception:
        return None
    finally:
        for spec in ready:
            store.clear_running(spec.run_id)


def _store(spec, model, outcome, data, store: RunStore, teachers, ctx, start) -> RunResult:
    """Evaluate and write one trained member, or record why it failed."""
    try:
        if isinstance(outcome, NonFiniteLoss):
            raise outcome
        keep = keeps_weights(spec, ctx.plan, data)
        finish_run(spec, model, outcome, data, store, teachers, keep, start)
    except TeacherNotComplete:  # an early student whose teacher failed: not its failure
        return blocked(spec)
    except Exception as err:  # a failed run costs only itself: record it, go on
        return record_failure(store, spec, err)
    return RunResult(spec.run_id, "complete", "complete")
