"""Progress reporting for a grid: runs done of total with ETA, and each run in training
(one line per worker process) with its step and loss, on a terminal (`RichReporter`); one
plain line per finished run when the output goes to a log file (`LogReporter`).

A run in this process reports its steps straight to the reporter. A worker process writes
its run's progress into its lane of a shared array (`Lanes`: no lock, no queue, so a worker
killed mid-write blocks nobody), which the executor reads while it waits for results.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
from collections import Counter
from typing import Protocol, TextIO

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter(Protocol):
    def start_grid(self, total: int, done: int, todo: int) -> None: ...
    def start_run(self, spec, steps: int, lane: int = 0) -> None: ...
    def step(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None: ...
    def show(self, lane: int, step: int, loss: float) -> None: ...
    def end_run(self, spec, status: str) -> None: ...
    def end_grid(self) -> None: ...


class NullReporter:
    def start_grid(self, total, done, todo): ...
    def start_run(self, spec, steps, lane=0): ...
    def step(self, step, idx, loss): ...
    def show(self, lane, step, loss): ...
    def end_run(self, spec, status): ...
    def end_grid(self): ...


def default_reporter(stream: TextIO | None = None) -> Reporter:
    """Live bars on a terminal; plain lines for a log file (nohup, CI, a batch job)."""
    stream = stream or sys.stderr
    if stream.isatty():
        return RichReporter(Console(file=stream))
    return LogReporter(stream)


def blocked_message(spec) -> str:
    """What `end_run` is told of a student not run because its teacher did not complete."""
    return f"skipped: its teacher {spec.teacher_id} did not complete"


class _Blocked:
    """Students skipped for want of their teacher, counted per teacher: one line each at
    the end of the grid rather than one per student."""

    def __init__(self):
        self.by_teacher: Counter[str] = Counter()

    def add(self, spec, status: str) -> bool:
        """Count `spec` if `status` says it was blocked; whether it was."""
        if spec.is_teacher or status != blocked_message(spec):
            return False
        self.by_teacher[spec.teacher_id] += 1
        return True

    def lines(self) -> list[str]:
        lines = [f"{n} student run(s) skipped: their teacher {t} did not complete (they run "
                 "once it does; `kdaudit status DIR` shows its error)"
                 for t, n in self.by_teacher.items()]  # fmt: skip
        self.by_teacher.clear()
        return lines


class LogReporter:
    """For output that is not a terminal: one plain line per finished run with the count
    done of those to run, the run's time and an estimate of the time left; no live bars,
    no wrapping."""

    def __init__(self, stream: TextIO | None = None, clock=time.monotonic):
        self.stream, self.clock = stream or sys.stderr, clock
        self.blocked = _Blocked()
        self.todo = self.done = 0
        self.started_at = 0.0
        self.run_started: dict[str, float] = {}

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def start_grid(self, total: int, done: int, todo: int) -> None:
        self._print(f"grid: {total} runs, {done} already complete, {todo} to run")
        self.todo, self.done, self.started_at = todo, 0, self.clock()

    def start_run(self, spec, steps: int, lane: int = 0) -> None:
        self.run_started[spec.run_id] = self.clock()

    def step(self, step, idx, loss): ...
    def show(self, lane, step, loss): ...

    def end_run(self, spec, status: str) -> None:
        self.done += 1
        started = self.run_started.pop(spec.run_id, None)
        if self.blocked.add(spec, status):
            return
        took = "" if started is None else f" ({duration(self.clock() - started)})"
        elapsed = self.clock() - self.started_at
        eta = elapsed / self.done * (self.todo - self.done)  # the runs so far, at the same pace
        self._print(f"[{self.done}/{self.todo}, eta {duration(eta)}] {spec.label}{took}: {status}")

    def end_grid(self) -> None:
        for line in self.blocked.lines():
            self._print(line)


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 07 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class RichReporter:
    """A rich display: the grid's bar and one line per run in training (its lane: this
    process, or a worker process). A run in this process has its loss read (a device sync)
    only every `every` steps."""

    def __init__(self, console: Console | None = None, every: int = 25):
        self.console = console or Console(stderr=True)
        self.every = every
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )  # fmt: skip
        self.grid_task = None
        self.lanes: dict[int, tuple[int, str]] = {}  # lane -> (task id, run label)
        self.blocked = _Blocked()

    def start_grid(self, total: int, done: int, todo: int) -> None:
        self.console.print(f"grid: {total} runs, {done} already complete, {todo} to run")
        self.progress.start()
        self.grid_task = self.progress.add_task("runs", total=todo)

    def start_run(self, spec, steps: int, lane: int = 0) -> None:
        label = f"  {spec.label}"
        if lane in self.lanes:  # the lane's line shows its new run, in place
            task = self.lanes[lane][0]
            self.progress.reset(task, total=steps, description=label)
        else:
            task = self.progress.add_task(label, total=steps)
        self.lanes[lane] = (task, label)

    def step(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None:
        if step % self.every == 0:
            self.show(0, step, loss.item())

    def show(self, lane: int, step: int, loss: float) -> None:
        task, label = self.lanes[lane]
        desc = label if math.isnan(loss) else f"{label} loss {loss:.4f}"
        self.progress.update(task, completed=step + 1, description=desc)

    def end_run(self, spec, status: str) -> None:
        if status != "complete" and not self.blocked.add(spec, status):
            self.console.print(f"[red]{spec.label}: {status}[/red]")
        self.progress.advance(self.grid_task)

    def end_grid(self) -> None:
        for task, _ in self.lanes.values():
            self.progress.remove_task(task)
        self.lanes.clear()
        self.progress.stop()
        for line in self.blocked.lines():
            self.console.print(f"[red]{line}[/red]")


# A lane: (number of the run in the executor's list, step, steps, loss); -1 = no run yet.
_FIELDS = 4


class Lanes:
    """Shared progress of N worker processes, one lane each; made by the executor and
    handed to its workers when they start (`writer`), read by the executor (`poll`)."""

    def __init__(self, n: int, mp=multiprocessing):
        self.array = mp.RawArray("d", [-1.0] * (_FIELDS * n))
        self.n = n
        self.seen = [(-1, -1)] * n  # (run number, step) last shown per lane

    def writer(self, lane: int) -> LaneWriter:
        return LaneWriter(self.array, lane)

    def poll(self, runs: list, reporter: Reporter) -> None:
        """Show each lane's run and step if they moved since the last poll; `runs`: the
        executor's list of runs, which the lanes name by number."""
        for lane in range(self.n):
            number, step, steps, loss = self.array[lane * _FIELDS : (lane + 1) * _FIELDS]
            number, step = int(number), int(step)
            if number < 0 or (number, step) == self.seen[lane]:
                continue
            if number != self.seen[lane][0]:
                reporter.start_run(runs[number], int(steps), lane)
            if step >= 0:
                reporter.show(lane, step, loss)
            self.seen[lane] = (number, step)


class LaneWriter:
    """A worker's reporter: writes its run's progress into its lane. The loss is read (a
    device sync) at most every `every` seconds."""

    def __init__(self, array, lane: int, every: float = 0.5):
        self.array, self.base, self.every = array, lane * _FIELDS, every
        self.number, self.read_at = -1, 0.0

    def start_grid(self, total, done, todo): ...

    def start_run(self, spec, steps: int, lane: int = 0) -> None:
        b = self.base
        self.array[b + 1], self.array[b + 2], self.array[b + 3] = -1.0, steps, math.nan
        self.array[b] = self.number  # last: a reader never pairs this run with the last's step

    def step(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None:
        now = time.monotonic()
        if now - self.read_at >= self.every:
            self.read_at = now
            self.array[self.base + 3] = loss.item()
        self.array[self.base + 1] = step

    def show(self, lane, step, loss): ...
    def end_run(self, spec, status): ...
    def end_grid(self): ...
