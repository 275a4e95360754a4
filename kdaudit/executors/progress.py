"""Progress reporting for a grid: runs done of total with ETA, the current run's step and loss."""

from __future__ import annotations

from typing import Protocol

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
    def start_run(self, spec, steps: int) -> None: ...
    def step(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None: ...
    def end_run(self, spec, status: str) -> None: ...
    def end_grid(self) -> None: ...


class NullReporter:
    def start_grid(self, total, done, todo): ...
    def start_run(self, spec, steps): ...
    def step(self, step, idx, loss): ...
    def end_run(self, spec, status): ...
    def end_grid(self): ...


class RichReporter:
    """A rich display; the loss is read (a device sync) only every `every` steps."""

    def __init__(self, console: Console | None = None, every: int = 25):
        self.console = console or Console(stderr=True)
        self.every = every
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )  # fmt: skip
        self.grid_task = self.run_task = None
        self.label = ""

    def start_grid(self, total: int, done: int, todo: int) -> None:
        self.console.print(f"grid: {total} runs, {done} already complete, {todo} to run")
        self.progress.start()
        self.grid_task = self.progress.add_task("runs", total=todo)

    def start_run(self, spec, steps: int) -> None:
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.label = f"  {spec.label}"
        self.run_task = self.progress.add_task(self.label, total=steps)

    def step(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None:
        if step % self.every == 0:
            desc = f"{self.label} loss {loss.item():.4f}"
            self.progress.update(self.run_task, completed=step + 1, description=desc)

    def end_run(self, spec, status: str) -> None:
        if status != "complete":
            self.console.print(f"[red]{spec.label}: {status}[/red]")
        self.progress.advance(self.grid_task)

    def end_grid(self) -> None:
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.progress.stop()
