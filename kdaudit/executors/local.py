"""The local executor: runs in N worker processes, or one by one in this process.

How many at once (`local_workers`): `workers` when given, else what the machine has: on the
CPU one worker per core, each with `threads` torch threads (1: CPU results are bitwise the
same as one run at a time in this process), on GPUs one worker per GPU; one (this process)
for stacking, on one GPU, for a grid of objects that exist in this process only, and for a
grid too small to pay for starting workers (POOL_MIN_STEPS).

Workers are forked from a fork server (never from this process, whose threads make fork
unsafe); each has `threads` torch threads and, on a machine with several GPUs, its own GPU
(cuda:i round robin). A worker trains a unit (`units`): one run, or on the CPU the MLP
students of a seed (of a few seeds) as one stack, which gives each the bits it has alone
(kdaudit.engine.stacking.train_one) and trains a step of 7 default-audit MLPs about 1.4x
faster than one at a time. Teachers go first; a student is submitted once its teacher is
complete, or, on a worker that would otherwise wait, while its teacher trains when it trains
without the teacher's outputs (SIDDO, RCD: `_early`; it waits for the teacher only to be
compared with it). A worker that dies (kill -9, out of memory) breaks the pool: a new pool is started
and the runs that were in flight are rerun, at most `max_retries` times each; exceptions
inside a run are recorded by `attempt`, never rerun.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

import torch

from kdaudit.engine.loop import total_steps
from kdaudit.executors.core import (
    EXECUTORS,
    ExecutorConfig,
    RunContext,
    RunResult,
    attempt,
    blocked,
    cpu_count,
    release_worker_state,
    stacks,
    system_failure,
    teacher_ready,
    trains_without_teacher,
)
from kdaudit.executors.local_stack import attempt_stack, stack_groups, stackable
from kdaudit.executors.progress import Lanes, LaneWriter, Reporter
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore, process_exists

SHOW_EVERY = 0.25  # seconds between reads of the workers' progress
# Fewer training steps than this (all runs to do, where their configs tell) run in this
# process: starting workers (a fork server that imports torch) takes seconds, about what
# 5,000 steps of a small MLP take on one core.
POOL_MIN_STEPS = 5000


@EXECUTORS.register("local")
def run_here(
    todo: list[RunSpec], ctx: RunContext, options: ExecutorConfig, reporter: Reporter
) -> None:
    """This machine: in worker processes, or in this process one run at a time (or `stack`
    at a time)."""
    workers = local_workers(todo, ctx, options)
    if workers > 1:
        run_pool(todo, ctx, replace(options, workers=workers), reporter)
    elif options.stack > 1:
        from kdaudit.executors.local_stack import run_stacked

        run_stacked(todo, ctx, options.stack, reporter)
    else:
        run_sequential(todo, ctx, reporter)


def local_workers(todo: list[RunSpec], ctx: RunContext, options: ExecutorConfig) -> int:
    """Runs at once: `workers` if given; else one per core (`threads` cores each) on the CPU
    or one per GPU, at most one per run; 1 for stacking, objects held in memory and grids
    of fewer than POOL_MIN_STEPS steps."""
    if options.workers is not None:
        return options.workers
    if options.stack > 1 or not all(travels(spec) for spec in todo):
        return 1
    if sum(known_steps(spec) or POOL_MIN_STEPS for spec in todo) < POOL_MIN_STEPS:
        return 1
    cpu = ctx.device == "cpu"
    machine = cpu_count() // options.threads if cpu else len(_devices(ctx.device))
    return max(1, min(machine, len(todo)))


def known_steps(spec: RunSpec) -> int | None:
    """The run's training steps, where its config tells without loading the data (None)."""
    n = getattr(spec.data, "n_train", None)
    if isinstance(n, int) and n > 0:
        return total_steps(n, spec.train)
    return spec.train.max_steps or None


def travels(spec: RunSpec) -> bool:
    """Whether a worker process can build the run: not from objects handed to
    kdaudit.audit(), which exist in this process only (kdaudit.user_code)."""
    parts = (spec.data, spec.model, spec.students_data)
    return all(getattr(part, "name", None) != "in_memory" for part in parts)


def run_sequential(todo: list[RunSpec], ctx: RunContext, reporter: Reporter) -> None:
    try:
        for spec in todo:
            result = attempt(spec, ctx, reporter)
            reporter.end_run(spec, result.message)
    finally:
        release_worker_state()  # this process is the caller's: free its memory


# Runs of one student seed (several seeds' where fewer) that a worker trains at once as one
# stack, at most (`units`): a seed's paired runs of the default audit are 7.
POOL_STACK = 8


def units(specs: list[RunSpec], ctx: RunContext) -> list[tuple[RunSpec, ...]]:
    """What a worker trains at once: students that `pooled` say stack, grouped by teacher,
    data, model and training (kdaudit.executors.local_stack.stack_groups), a seed's runs
    together, at most POOL_STACK; every other run alone. Teachers stay first."""
    stacked = [s for s in specs if pooled(s, ctx)]
    alone = [(s,) for s in specs if not pooled(s, ctx)]
    return alone + [tuple(group) for group in stack_groups(stacked, POOL_STACK)]


def pooled(spec: RunSpec, ctx: RunContext) -> bool:
    """Whether the pool stacks this run with others: a student of kdaudit's MLP on the CPU,
    which `train_one` trains as a stack even alone (kdaudit.engine.stacking.stacks_alone),
    so that any stack it joins gives the same bits (measured faster: README, Performance)."""
    return (ctx.device == "cpu" and not spec.is_teacher and stacks(spec, ctx.plan)
            and stackable(spec))  # fmt: skip


def run_pool(
    todo: list[RunSpec], ctx: RunContext, options: ExecutorConfig, reporter: Reporter
) -> None:
    store = RunStore(ctx.out)
    queue, waiting = _ready_and_waiting(todo, store, reporter, ctx)
    deaths: Counter[str] = Counter()
    idle_deaths = 0  # pools that died with no run in flight: workers crashing at start-up
    while queue:
        lost = _one_pool(queue, waiting, ctx, options, reporter)
        in_flight = set(store.running()) & {s.run_id for s in lost}
        # A student started beside its teacher died with the pool its teacher died in: no
        # death of its own (and it waits for the teacher again, `_requeue`).
        beside = {s.run_id for s in lost if s.teacher_id in {t.run_id for t in lost}}
        for run_id in in_flight & beside:
            store.clear_running(run_id)
        in_flight -= beside
        idle_deaths = 0 if in_flight or not lost else idle_deaths + 1
        if idle_deaths > options.max_retries:
            raise RuntimeError(
                f"the local worker processes died {idle_deaths} times before starting a run; "
                "rerun with --workers 1 to see the error"
            )
        retry = _to_retry(lost, in_flight, store, deaths, options, waiting, reporter, ctx)
        queue.extendleft(reversed(units(_requeue(retry, store, waiting, reporter), ctx)))
    for student in (s for students in waiting.values() for s in students):
        reporter.end_run(student, blocked(student).message)  # its teacher never finished


def _requeue(retry: list[RunSpec], store: RunStore, waiting, reporter: Reporter) -> list:
    """Of the runs a dead pool lost (or early students that stopped waiting), those to queue
    again; an early student (started beside its teacher) whose teacher is not complete waits
    for it again, or is blocked if the teacher is now failed."""
    queue = []
    for spec in retry:
        if teacher_ready(store, spec):
            queue.append(spec)
        elif store.failure(spec.teacher_id) is None:
            waiting[spec.teacher_id].append(spec)
        else:
            reporter.end_run(spec, blocked(spec).message)
    return queue


def _ready_and_waiting(todo: list[RunSpec], store: RunStore, reporter: Reporter, ctx):
    """Units that can start now (teachers first), and students by the teacher they wait for."""
    ready: list[RunSpec] = []
    waiting: dict[str, list[RunSpec]] = defaultdict(list)
    in_todo = {s.run_id for s in todo}
    for spec in todo:
        if teacher_ready(store, spec):
            ready.append(spec)
        elif spec.teacher_id in in_todo:
            waiting[spec.teacher_id].append(spec)
        else:  # its teacher failed before and is not retried
            reporter.end_run(spec, blocked(spec).message)
    return deque(units(ready, ctx)), waiting


def _one_pool(queue, waiting, ctx, options, reporter) -> list[RunSpec]:
    """Run the queue of units (and the students it releases) until done or until a worker
    dies; return the runs the dead pool did not finish."""
    mp = _context()
    lanes = Lanes(options.workers, mp)
    pool = _new_pool(mp, options.workers, _devices(ctx.device), ctx.threads, lanes)
    futures: dict[Future, tuple[RunSpec, ...]] = {}
    numbered: list[RunSpec] = []  # the lanes name units by the number of their first run here
    store = RunStore(ctx.out)

    def submit(unit: tuple[RunSpec, ...], early: bool = False) -> None:
        numbered.append(unit[0])
        stacked = len(unit) > 1 or pooled(unit[0], ctx)  # here, where every condition is known
        future = pool.submit(_attempt_in_worker, unit, ctx, len(numbered) - 1, early, stacked)
        futures[future] = unit

    try:
        while queue or futures:
            while queue:
                submit(queue.popleft())
            for unit in _early(waiting, futures, options.workers - len(futures), store, ctx):
                submit(unit, early=True)
            done, _ = wait(futures, timeout=SHOW_EVERY, return_when=FIRST_COMPLETED)
            lanes.poll(numbered, reporter)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                pool.shutdown(wait=True)  # every future is now done: finished, or lost
                done = set(futures)
            lost = []
            for future in done:
                unit = futures.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):
                    lost.extend(unit)
                    continue
                for spec, result in future.result():
                    _finished(spec, result, queue, waiting, reporter, ctx)
            if lost:
                return lost
        pool.shutdown(wait=True)  # idle workers exit now, none is left half-started
        return []
    except BaseException:  # Ctrl-C or an error that stops the grid: stop the runs in flight
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def _early(waiting: dict, futures: dict, free: int, store: RunStore, ctx) -> list[tuple]:
    """Units of students to start on `free` idle workers while their teacher trains: those
    that train without it (`trains_without_teacher`), of a teacher in flight that has not
    failed before. Taken out of `waiting`; each waits for its teacher before it is compared
    with it (kdaudit.engine.teachers.wait_for_teacher). Teachers go first in the pool's
    queue, so a teacher in flight gets its worker before any of its early students."""
    if free <= 0:
        return []
    in_flight = {spec.run_id for unit in futures.values() for spec in unit}
    early: list[tuple] = []
    for teacher_id, students in waiting.items():
        if teacher_id not in in_flight or store.failure(teacher_id) is not None:
            continue
        taken = units([s for s in students if trains_without_teacher(s)], ctx)[: free - len(early)]
        for unit in taken:
            for student in unit:
                students.remove(student)
        early += taken
        if len(early) == free:
            break
    return early


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def _finished(spec: RunSpec, result: RunResult, queue, waiting, reporter: Reporter,
              ctx: RunContext) -> None:  # fmt: skip
    if result.status == "blocked":  # an early student that stopped waiting for its teacher
        # (its worker died, or it was slow to start): not an end unless the teacher failed
        queue.extend(units(_requeue([spec], RunStore(ctx.out), waiting, reporter), ctx))
        return
    reporter.end_run(spec, result.message)
    students = waiting.pop(spec.run_id, ())
    if result.status == "complete":
        queue.extend(units(list(students), ctx))
        return
    for student in students:
        reporter.end_run(student, blocked(student).message)


def _to_retry(lost, in_flight: set, store: RunStore, deaths: Counter, options, waiting,
              reporter, ctx) -> list:  # fmt: skip
    """Runs a dead pool lost. Those that were in flight (they left an in-flight mark) count a
    worker death each; queued ones go back for free."""
    retry = []
    for spec in lost:
        if spec.run_id in in_flight:
            deaths[spec.run_id] += 1
            store.clear_running(spec.run_id)
        if deaths[spec.run_id] <= options.max_retries:
            retry.append(spec)
            continue
        error = (f"WorkerDied: its worker process died {deaths[spec.run_id]} times (killed, or "
                 f"out of memory?); not retried after {options.max_retries}")  # fmt: skip
        _finished(spec, system_failure(store, spec, error), retry, waiting, reporter, ctx)
    return retry


def _new_pool(mp, workers: int, devices: list[str], threads: int, lanes: Lanes):
    slots = mp.SimpleQueue()
    for i in range(workers):  # (lane, device) of each worker
        slots.put((i, devices[i % len(devices)]))
    return ProcessPoolExecutor(workers, mp_context=mp, initializer=_start_worker,
                               initargs=(slots, threads, lanes.array, os.getpid()))  # fmt: skip


def _context():
    """A fork server that has imported torch and kdaudit once: a new worker is a fork of it
    (a fraction of a second) rather than a fresh interpreter importing torch (seconds). Plain
    fork is unsafe once torch has started threads in this process; spawn is the fallback."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["kdaudit.executors.core"])
    return mp


def _devices(device: str) -> list[str]:
    """cuda (no index) on a machine with several GPUs: one GPU per worker, round robin."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


_WORKER_DEVICE: str | None = None
_LANE: LaneWriter | None = None


def _start_worker(slots, threads: int, lanes, driver: int) -> None:
    global _WORKER_DEVICE, _LANE
    _die_with_parent()
    _die_with_driver(driver)
    lane, _WORKER_DEVICE = slots.get()
    _LANE = LaneWriter(lanes, lane)
    torch.set_num_threads(threads)


def _attempt_in_worker(unit: tuple, ctx: RunContext, number: int, early: bool,
                       stacked: bool) -> list[tuple]:  # fmt: skip
    """Per run of the unit (one run, or a stack: `units`) its RunResult."""
    _LANE.number = number
    ctx = replace(ctx, device=_WORKER_DEVICE or ctx.device)
    if not stacked:
        return [(unit[0], attempt(unit[0], ctx, _LANE, early))]
    return attempt_stack(list(unit), ctx, _LANE, early)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the driver dies (even by kill -9), so no orphan
    keeps training into the store after its grid is gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _die_with_driver(driver: int) -> None:
    """A worker forked by the fork server is the server's child, not the driver's, and it
    holds the server's liveness pipe open, so neither notices the driver's death by itself:
    the worker watches the driver and kills itself when it dies (even by kill -9); the
    server then sees its pipe close and exits too."""
    threading.Thread(target=_watch, args=(driver,), name="kdaudit-driver-watch",
                     daemon=True).start()  # fmt: skip


def _watch(driver: int) -> None:
    try:
        fd = os.pidfd_open(driver)  # Linux >= 5.3: readable once the driver has exited
    except ProcessLookupError:
        fd = None  # already gone
    except (AttributeError, OSError):  # another OS: poll
        while process_exists(driver):
            time.sleep(1.0)
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)
