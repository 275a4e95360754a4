"""The Ray executor: every run is a Ray task; a student's task depends on its teacher's.

Each task asks for `threads` CPUs (and `gpus_per_run` GPUs) and writes its run into the store
directory itself, so on a cluster DIR must be a path every node sees (a shared filesystem)
and kdaudit must be installed on every node. Without an address Ray starts a local cluster
for the grid and stops it afterwards; a Ray already initialised in this process is reused.

Retries: Ray reruns a task whose worker process died, at most `max_retries` times. A run
that raises (NaN loss included) is recorded as failed inside the task, which then returns
normally, so Ray never retries it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from kdaudit.executors.core import (
    EXECUTORS,
    ExecutorConfig,
    RunContext,
    RunResult,
    attempt,
    blocked,
    cpu_count,
    system_failure,
    teacher_ready,
)
from kdaudit.executors.progress import Reporter
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(
            "--executor ray needs Ray: pip install 'kdaudit[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


@EXECUTORS.register("ray")
def run_ray(
    todo: list[RunSpec], ctx: RunContext, options: ExecutorConfig, reporter: Reporter
) -> None:
    ray = import_ray()
    started_here = _connect(ray, options, ctx.threads)
    try:
        gpus = _gpus_per_run(ray, options, ctx.device)
        ctx = replace(ctx, device="cuda" if gpus else "cpu")  # a GPU task sees its GPU(s) only
        task = ray.remote(
            num_cpus=ctx.threads, num_gpus=gpus, max_retries=options.max_retries,
            retry_exceptions=False,
        )(_attempt_task)  # fmt: skip
        pending = _submit(task, todo, ctx, reporter)
        try:
            _collect(ray, pending, RunStore(ctx.out), reporter)
        except BaseException:  # Ctrl-C or a stopping error: no task may outlive the lock
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _attempt_task(spec: RunSpec, ctx: RunContext, teacher: RunResult | None) -> RunResult:
    """The Ray task. `teacher` is only there so that Ray starts it after its teacher's task:
    whether the teacher completed is read from the store by `attempt`."""
    return attempt(spec, ctx)


def _submit(task, todo: list[RunSpec], ctx: RunContext, reporter: Reporter) -> dict:
    store = RunStore(ctx.out)
    refs, pending = {}, {}
    for spec in todo:
        if teacher_ready(store, spec):
            depends_on = None
        elif spec.teacher_id in refs:
            depends_on = refs[spec.teacher_id]  # an ObjectRef: Ray waits for the teacher
        else:
            reporter.end_run(spec, blocked(spec).message)
            continue
        refs[spec.run_id] = task.options(name=spec.label).remote(spec, ctx, depends_on)
        pending[refs[spec.run_id]] = spec
    return pending


def _collect(ray, pending: dict, store: RunStore, reporter: Reporter) -> None:
    left = list(pending)
    while left:
        done, left = ray.wait(left, num_returns=1)
        spec = pending[done[0]]
        reporter.end_run(spec, _result(ray, done[0], spec, store).message)


def _result(ray, ref, spec: RunSpec, store: RunStore) -> RunResult:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        # RayTaskError wraps an exception raised in the task, or the death of a task it
        # depends on (its teacher's); anything else is the death of its own worker or node.
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
        if not isinstance(cause, ray.exceptions.RayError):
            # Raised outside the run's own guard (e.g. the dataset would not load): stop.
            raise err.as_instanceof_cause() from None
        if not teacher_ready(store, spec):
            return blocked(spec)  # its teacher's task is the one that died
        lines = str(cause).strip().splitlines()
        error = f"{type(cause).__name__}: {lines[0] if lines else 'worker died'}"
        return system_failure(store, spec, error, str(err))


def _connect(ray, options: ExecutorConfig, threads: int) -> bool:
    """Connect to the cluster; True when this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    cpus = (options.workers or max(1, cpu_count() // threads)) * threads
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)  # fmt: skip
    return True


def _gpus_per_run(ray, options: ExecutorConfig, device: str) -> float:
    if device == "cpu":
        return 0.0
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    wanted = options.gpus_per_run
    if wanted is None:
        wanted = 1.0 if has_gpus else 0.0
    if wanted > 0 and not has_gpus:
        raise RuntimeError(f"gpus_per_run={wanted:g}, but the Ray cluster has no GPU")
    if device.startswith("cuda") and wanted == 0:
        raise RuntimeError("--device cuda was asked for, but the Ray cluster has no GPU")
    return wanted
