"""Fault injection: kill -9 of the whole grid at random moments, damaged run directories,
two `kdaudit run` on one directory, and failed runs in the report."""

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kdaudit import api
from kdaudit.cli import main
from kdaudit.conditions import objectives as conditions
from kdaudit.config import load_config
from kdaudit.executors import grid_status, run_local
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.fault_helpers import assert_same_runs, child_env, cli, intact_runs

pytestmark = pytest.mark.slow  # end to end: whole grids through the CLI or API

EPOCHS = "train.epochs=40"


def _kill_at_a_random_moment(cmd, out, rng) -> bool:
    """Start a grid, kill -9 its whole process group once a random number of runs more are
    complete plus a random fraction of a run; False when it finished first."""
    before = len(intact_runs(out)) if out.exists() else 0
    target, extra = before + rng.randint(0, 3), rng.uniform(0.0, 0.4)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env(), start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        runs = out / "runs"
        done = sum(not p.name.startswith(".") for p in runs.iterdir()) if runs.is_dir() else 0
        if done >= target:
            time.sleep(extra)
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
    proc.wait()
    return killed


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tiny_config, tmp_path):
    cfg = load_config(tiny_config, [EPOCHS])
    run_local(cfg, tmp_path / "reference", "cpu")
    out, rng, kills = tmp_path / "out", random.Random(6), 0
    seen: dict[str, int] = {}
    for i in range(3):  # alternate the sequential executor and two worker processes
        workers = ["--workers", "2"] if i % 2 else []
        kills += _kill_at_a_random_moment(
            cli(tiny_config, out, "--set", EPOCHS, *workers), out, rng
        )
        now = intact_runs(out)  # every run directory present is complete and intact
        assert {k: now[k] for k in seen} == seen, "a complete run was lost or redone"
        seen = now
    assert kills >= 2
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu",
                 "--set", EPOCHS]) == 0  # fmt: skip
    final = intact_runs(out)
    assert len(final) == 7 and {k: final[k] for k in seen} == seen
    assert not list((out / "runs").glob(".tmp-*")) and not (out / "running").exists()
    assert_same_runs(expand(cfg), tmp_path / "reference", out)  # nothing half-written was kept


def _damage(out, grid):
    store = RunStore(out)
    teacher, s1, s2, s3, s4, s5 = (store.runs / spec.run_id for spec in grid.runs[:6])
    (teacher / "train_logits.npy").write_bytes((teacher / "train_logits.npy").read_bytes()[:-40])
    (s1 / "record.json").write_text((s1 / "record.json").read_text()[:100])
    (s2 / "test_logits.npy").write_bytes((s2 / "test_logits.npy").read_bytes()[:-4])
    (s3 / "test_logits.npy").unlink()
    record = json.loads((s4 / "record.json").read_text())  # as written by an older kdaudit
    del record["files"]
    (s4 / "record.json").write_text(json.dumps(record))
    (s4 / "test_logits.npy").write_bytes((s4 / "test_logits.npy").read_bytes()[:200])
    store.failed.mkdir()
    (store.failed / f"{s5.name}.json").write_text('{"run_id": "trunc')
    return {p.name for p in (teacher, s1, s2, s3, s4)}


def test_damaged_run_directories_are_moved_aside_and_redone(tiny_config, tmp_path, capsys):
    cfg = load_config(tiny_config)
    grid, out = expand(cfg), tmp_path / "out"
    run_local(cfg, tmp_path / "reference", "cpu")
    run_local(cfg, out, "cpu")
    damaged = _damage(out, grid)
    status = grid_status(out)
    assert {c["run_id"] for c in status["corrupt_runs"]} == damaged
    assert status["complete"] == 2
    # Before any repair, the report reads the intact runs and leaves the damaged ones out.
    reported = api.report(out)
    assert set(reported.runs.run_id) == {s.run_id for s in grid.students} - damaged
    assert reported.teachers.empty  # the teacher's train logits were truncated
    store = RunStore(out)
    untouched = {s.run_id: (store.runs / s.run_id / "record.json").stat().st_mtime_ns
                 for s in grid.runs if s.run_id not in damaged}  # fmt: skip
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("damaged run directory moved aside and redone") == 6  # + the failure
    moved = sorted(p.name for p in (out / "corrupt").iterdir())
    assert len(moved) == 6 and all(any(m.startswith(d) for m in moved) for d in damaged)
    final = intact_runs(out)
    assert len(final) == 7 and {k: final[k] for k in untouched} == untouched
    assert_same_runs(grid, tmp_path / "reference", out)


def test_a_second_kdaudit_run_on_the_same_directory_is_refused(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(cli(tiny_config, out), env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "running").is_dir() and first.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # paused mid-grid, holding the lock
    try:
        assert main(["status", str(out)]) == 0
        assert f"in progress: `kdaudit run` pid {first.pid} on" in capsys.readouterr().out
        second = main(["run", str(tiny_config), "--out", str(out), "--device", "cpu"])
    finally:
        first.send_signal(signal.SIGCONT)
    assert second == 2
    assert f"in use by another `kdaudit run` (pid {first.pid} on" in capsys.readouterr().err
    assert first.wait() == 0
    assert len(intact_runs(out)) == 7 and grid_status(out)["in_progress"] is None


def test_the_report_lists_failed_runs_and_excludes_them(tmp_path, monkeypatch):
    from tests.conftest import write_config

    original = conditions.build_objective
    seed = {"now": None}

    def poisoned(name, *args, **kwargs):
        objective = original(name, *args, **kwargs)
        if name != "kd" or seed["now"] != 11:
            return objective
        return lambda *a, **k: objective(*a, **k) * float("inf")

    def execute(spec, *args, **kwargs):
        seed["now"] = spec.student_seed
        return real_execute(spec, *args, **kwargs)

    from kdaudit.executors import core

    real_execute = core.execute
    monkeypatch.setattr("kdaudit.engine.run.build_objective", poisoned)
    monkeypatch.setattr(core, "execute", execute)
    config = write_config(tmp_path, protocol={"student_seeds": [10, 11, 12]})
    result = api.run(config, tmp_path / "out", device="cpu")
    outcome = result.outcome
    (failed,) = outcome.failed
    assert failed.startswith("kd_a0.5_T1_t0_s11")
    kd = result.runs[(result.runs.condition == "kd") & (result.runs.metric == "accuracy")]
    assert len(kd) == 2  # n = 2 of 3: the failed run is excluded
    assert set(result.analysis.tests_frame().n) == {2}  # paired tests on the 2 seeds left
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "Failed runs" in md and failed in md and "NaN or inf" in md


def test_status_shows_failed_runs_with_errors(tiny_config, tmp_path, capsys):
    cfg = load_config(tiny_config, ["train.lr=1.0e+30"])
    run_local(cfg, tmp_path / "out", "cpu")
    assert main(["status", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "1 failed, 6 blocked by a failed teacher" in printed
    assert "at step 19: NonFiniteLoss: the training loss became NaN or inf" in printed


def _descendants(pid: int) -> set[int]:
    """Every living process below `pid` (Linux /proc), the fork server's workers included."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _living(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]}  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_the_driver_alone_leaves_no_worker_or_fork_server_behind(tiny_config, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(tiny_config, out, "--set", "train.epochs=400", "--workers", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env())  # fmt: skip
    deadline, below = time.time() + 120, set()
    while time.time() < deadline and proc.poll() is None and len(below) < 3:
        below = _descendants(proc.pid)  # resource tracker, fork server, a worker
        time.sleep(0.2)
    assert proc.poll() is None and len(below) >= 3, "the grid never started its workers"
    proc.send_signal(signal.SIGKILL)  # the driver only: its workers are not in its group
    proc.wait()
    deadline = time.time() + 30
    while _living(below) and time.time() < deadline:
        time.sleep(0.2)
    assert not _living(below), f"orphans left alive: {sorted(_living(below))}"
