"""Fault injection at scale: kill -9 whole grids and single Ray workers, count what was lost.

    python benchmarks/fault_campaign.py [--kills 12] [--worker-kills 4]
        [--executors sequential,workers,ray] [--config configs/mnist1d.yaml] [--set k=v]...

Grid kills: a `kdaudit run` child (cycling through the executors) is killed with SIGKILL, with
its whole process group, once a random number (0-3) of further runs are complete plus a
random delay; after each kill every run directory must be complete and intact (sizes and
sha256 of its files), and every run complete before must still be there, unchanged. When a
grid completes, it is checked bit for bit against a reference run and a new one starts.
Worker kills: one Ray grid in which a watcher kills a Ray worker in the middle of a run, at
most once per run; the grid must complete with no failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kdaudit.config import load_config
from kdaudit.executors import ExecutorConfig, run_grid
from kdaudit.store import RunStore

SMALL = ["data.n_train=2000", "data.n_test=500", "train.epochs=8",
         "protocol.student_seeds=[10, 11, 12]"]  # fmt: skip
FLAGS = {
    "sequential": ["--workers", "1"],
    "workers": ["--workers", "2"],
    "ray": ["--executor", "ray"],
}


def intact(out: Path) -> dict[str, str]:
    """Run id -> sha256 of its test logits, for every run directory; fails on a bad one."""
    store, found = RunStore(out), {}
    for path in sorted(store.runs.iterdir()) if store.runs.is_dir() else ():
        if path.name.startswith("."):
            continue
        problem = store.verify(path.name, checksums=True)
        assert problem is None, f"{path.name} is read as complete but {problem}"
        found[path.name] = store.record(path.name)["files"]["test_logits.npy"]["sha256"]
    return found


def kill_grid(cmd: list[str], out: Path, rng: random.Random) -> tuple[bool, int]:
    """(killed, runs in flight at the kill)."""
    target = len(intact(out)) + rng.randint(0, 3)
    delay = rng.uniform(0.0, 1.0)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    while proc.poll() is None:
        runs = out / "runs"
        if runs.is_dir() and sum(not p.name.startswith(".") for p in runs.iterdir()) >= target:
            time.sleep(delay)
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        return False, 0
    in_flight = len(RunStore(out).running())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True, in_flight


def same_as(reference: Path, out: Path) -> bool:
    ref = RunStore(reference)
    return all(
        np.array_equal(ref.array(r, "test_logits"), RunStore(out).array(r, "test_logits"))
        for r in intact(reference)
    )


def grid_kills(args, config_args: list[str], base: Path) -> None:
    rng = random.Random(args.seed)
    reference = base / "reference"
    subprocess.run(_cmd(args.config, config_args, reference, "sequential"), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    total = len(intact(reference))
    executors = args.executors.split(",")
    kills = lost = changed = redone = grids = 0
    out, seen = None, {}
    for i in range(args.kills):
        if out is None:
            grids += 1
            out, seen = base / f"grid{grids}", {}
        cmd = _cmd(args.config, config_args, out, executors[i % len(executors)])
        killed, in_flight = kill_grid(cmd, out, rng)
        kills += killed
        redone += in_flight
        now = intact(out)
        lost += sum(r not in now for r in seen)
        changed += sum(r in now and now[r] != seen[r] for r in seen)
        seen = now
        if len(now) == total:
            assert same_as(reference, out), f"{out} differs from the reference"
            out = None
    if out is not None:
        subprocess.run(_cmd(args.config, config_args, out, "sequential"), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        lost += sum(r not in intact(out) for r in seen)
        assert len(intact(out)) == total and same_as(reference, out)
    print(f"grid kills: {kills} kill -9 injected over {grids} grids of {total} runs "
          f"({', '.join(executors)}); complete runs lost: {lost}, rewritten: {changed}; "
          f"runs in flight at a kill (redone): {redone}; every grid completed bit-identical "
          "to the reference")  # fmt: skip


def worker_kills(args, config_args: list[str], base: Path) -> None:
    """One Ray grid; a watcher kills the worker of `--worker-kills` different runs mid-run."""
    cfg = load_config(args.config, config_args)
    out = base / "ray-worker-kills"
    killed: list[str] = []

    def watch():
        marks = out / "running"
        while len(killed) < args.worker_kills and not done.is_set():
            for mark in marks.glob("*.json") if marks.is_dir() else ():
                if mark.stem in killed:
                    continue
                time.sleep(0.2)  # well into the run
                try:
                    os.kill(json.loads(mark.read_text())["pid"], signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    continue
                killed.append(mark.stem)
                break
            time.sleep(0.02)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome = run_grid(cfg, out, ExecutorConfig("ray", max_retries=3), "cpu")
    done.set()
    print(f"ray worker kills: {len(killed)} workers killed mid-run; grid {outcome.completed}/"
          f"{outcome.total} complete, {len(outcome.failed)} failed")  # fmt: skip


def _cmd(config: str, config_args: list[str], out: Path, executor: str) -> list[str]:
    cmd = [sys.executable, "-m", "kdaudit.cli", "run", config, "--out", str(out),
           "--device", "cpu", *FLAGS[executor]]  # fmt: skip
    for item in config_args:
        cmd += ["--set", item]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mnist1d.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--worker-kills", type=int, default=4)
    p.add_argument("--executors", default="sequential,workers,ray")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    config_args = SMALL + args.overrides
    base = Path(tempfile.mkdtemp(prefix="kdaudit-faults-"))
    print(f"config {args.config} {' '.join(config_args)}; in {base}")
    if args.kills:
        grid_kills(args, config_args, base)
    if args.worker_kills:
        worker_kills(args, config_args, base)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
