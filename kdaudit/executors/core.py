"""What every executor shares: its options, the outcome of a grid, and one attempt at one run.

`attempt` is the unit of work an executor ships to a worker (this process, a local worker
process or a Ray task). It never raises for a failed run: an exception in training (NaN loss
included) is recorded in the store and returned as a result, so a retry mechanism that sees
only worker deaths (Ray's `max_retries`) never reruns a run that is bound to fail again.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kdaudit.conditions import CONDITIONS, LossConditionConfig, condition, loss_condition
from kdaudit.data import TensorData, load_data
from kdaudit.engine.loop import total_steps
from kdaudit.engine.run import execute
from kdaudit.engine.teachers import TeacherNotComplete, Teachers, keeps_weights
from kdaudit.errors import ConfigError
from kdaudit.executors.progress import Reporter, blocked_message
from kdaudit.models.mlp import MLPConfig
from kdaudit.protocol import RunSpec, TeacherPlan
from kdaudit.registry import Registry
from kdaudit.store import RunStore

# name -> run(todo, ctx, options, reporter): every run of `todo` attempted and reported.
# The executor modules register themselves (kdaudit.executors imports them).
EXECUTORS: Registry = Registry("executor")


@dataclass(frozen=True)
class ExecutorConfig:
    """How a grid is executed. None of it changes what a run computes, except `threads`
    (CPU results are bitwise reproducible for a fixed number of intra-op threads per run)
    and `stack` > 1 (stacked runs equal runs alone up to rounding: kdaudit.engine.stacking)."""

    name: str = "local"  # local | ray
    workers: int | None = None  # runs at once: local processes (None = the machine's: one
    # per core / threads on the CPU, one per GPU; 1 runs in this process);
    # ray: CPUs of the local cluster in units of runs (None = all cores / threads)
    threads: int = 1  # torch intra-op CPU threads per run (and the CPUs a Ray task asks for)
    address: str | None = None  # ray: an existing cluster; None starts a local one
    max_retries: int = 3  # reruns of a run whose worker process died; exceptions never rerun
    gpus_per_run: float | None = None  # ray: None = 1 when the cluster has GPUs (device allowing)
    stack: int = 1  # runs trained at once as one stacked model (1: one at a time)

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ConfigError(f"executor: {self.name!r} is not allowed; choose one of "
                              f"{', '.join(EXECUTORS.names())}")  # fmt: skip
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.stack < 1:
            raise ConfigError(f"stack: must be >= 1, got {self.stack}")
        if self.stack > 1 and (self.name == "ray" or (self.workers or 1) > 1):
            raise ConfigError("stack applies to the sequential local executor (workers 1)")
        if self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.name != "ray" and (self.address or self.gpus_per_run is not None):
            raise ConfigError("address and gpus_per_run apply to the ray executor only")
        if self.address and self.workers:
            raise ConfigError("workers sizes a local Ray cluster; with an address the "
                              "cluster's own CPUs decide how many runs go at once")  # fmt: skip


@dataclass(frozen=True)
class GridOutcome:
    total: int
    skipped: int  # complete before this call
    completed: int  # completed by this call
    failed: tuple[str, ...]  # run ids that failed (now or before, when not retried)
    blocked: int = 0  # students not run because their teacher is not complete
    quarantined: tuple[str, ...] = ()  # damaged run directories moved to DIR/corrupt/ to redo


@dataclass(frozen=True)
class RunContext:
    """What a worker needs, besides a run's spec, to execute it (small and picklable)."""

    out: str
    device: str  # resolved: cpu | cuda | cuda:N
    threads: int
    data_dir: str | None
    grid_token: str  # one per grid: worker caches of teacher outputs do not outlive it
    plan: TeacherPlan = TeacherPlan()  # what the grid asks of its teachers


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str  # complete | failed | blocked
    message: str  # for the progress display


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was asked for, but torch sees no CUDA GPU; use cpu or auto"
        )
    return torch.device(name)


def attempt(
    spec: RunSpec, ctx: RunContext, reporter: Reporter | None = None, early: bool = False
) -> RunResult:
    """Run one run in this process and store it, or record why it failed.
    Loading the data is outside the guard: a dataset that cannot load stops the grid.
    `early`: a student that trains without its teacher (`trains_without_teacher`), started
    while its teacher runs; it waits for the teacher before it is compared with it."""
    store = RunStore(ctx.out)
    if not (early or teacher_ready(store, spec)):
        return blocked(spec)
    with cpu_threads(ctx.threads):
        data, teachers = worker_state(spec, ctx)
        if reporter is not None:
            reporter.start_run(spec, total_steps(data.n_train, spec.train))
        on_step = reporter.step if reporter is not None else None
        store.mark_running(spec.run_id)
        try:
            keep = keeps_weights(spec, ctx.plan, data)
            execute(spec, data, store, teachers, keep, on_step, stacks(spec, ctx.plan))
        except (KeyboardInterrupt, SystemExit):
            raise
        except TeacherNotComplete:
            return blocked(spec)
        except Exception as err:  # a failed run costs only itself: record it, go on
            return record_failure(store, spec, err)
        finally:
            store.clear_running(spec.run_id)
    return RunResult(spec.run_id, "complete", "complete")


def record_failure(store: RunStore, spec: RunSpec, err: Exception) -> RunResult:
    """Store why a run raised (its traceback, and the step for a non-finite loss)."""
    error = f"{type(err).__name__}: {err}"
    store.write_failure(spec, error, traceback.format_exc(), getattr(err, "step", None))
    return RunResult(spec.run_id, "failed", f"failed: {error}")


def teacher_ready(store: RunStore, spec: RunSpec) -> bool:
    """A teacher can always run; a student once its teacher is complete."""
    return spec.is_teacher or store.is_complete(spec.teacher_id)


def trains_without_teacher(spec: RunSpec) -> bool:
    """A student whose training reads nothing of its teacher (SIDDO, RCD, LS, DISDO): it can
    train while its teacher does, and needs the teacher only to be compared with it."""
    return not spec.is_teacher and not condition(spec.condition).needs_teacher


def blocked(spec: RunSpec) -> RunResult:
    # Not a failure of this run: it stays pending and runs once its teacher exists.
    return RunResult(spec.run_id, "blocked", blocked_message(spec))


def system_failure(store: RunStore, spec: RunSpec, error: str, detail: str = "") -> RunResult:
    """Record a run whose worker kept dying (killed, out of memory, node lost)."""
    store.write_failure(spec, error, detail, None, kind="system")
    return RunResult(spec.run_id, "failed", f"failed: {error}")


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# One per worker process: the dataset on its device, and teacher outputs loaded once per grid.
_STATE: dict = {}


def release_worker_state() -> None:
    """Drop the cached dataset and teacher outputs (device memory included)."""
    _STATE.clear()


def worker_state(spec: RunSpec, ctx: RunContext) -> tuple[TensorData, Teachers]:
    """The run's data on the worker's device and the grid's teachers, loaded once per worker
    process and grid; a run of your own loss makes its condition known here too."""
    if _STATE.get("token") != ctx.grid_token:
        _STATE.clear()
        _STATE["token"] = ctx.grid_token
    know_conditions([spec])
    load = lambda cfg: _data(cfg, ctx)  # noqa: E731
    key = ("teachers", ctx.device)
    if key not in _STATE:
        _STATE[key] = Teachers(RunStore(ctx.out), torch.device(ctx.device), load)
    return load(spec.data), _STATE[key]


def know_conditions(specs: list[RunSpec]) -> None:
    """Make the conditions of runs of your own loss known in this (fresh worker) process."""
    for spec in specs:
        if spec.loss is not None and spec.condition not in CONDITIONS:
            loss_condition(LossConditionConfig(spec.loss, spec.condition))


def stacks(spec: RunSpec, plan: TeacherPlan) -> bool:
    """Whether the run may train as a stack (kdaudit.engine.stacking.train_one; on the CPU):
    a run of kdaudit's MLP (not a model of yours, which your own loop trains to the same
    bits: kdaudit.plan), in a grid without feature-map students, which hook the model's
    modules (a stack bypasses them) and at alpha = 0 must train exactly the SIDDO model."""
    return isinstance(spec.model, MLPConfig) and not plan.features


def _data(cfg, ctx: RunContext):
    key = ("data", cfg, ctx.device)
    if key not in _STATE:
        data_dir = Path(ctx.data_dir) if ctx.data_dir else None
        _STATE[key] = load_data(cfg, data_dir).to(ctx.device)
    return _STATE[key]
