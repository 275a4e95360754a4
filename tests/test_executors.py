"""Executors: the local worker pool against the sequential executor, dependencies, failures,
a worker killed mid-run, the lock, options. Ray is in test_ray.py."""

import os

import pytest

from kdaudit.cli import main
from kdaudit.config import ConfigError, load_config
from kdaudit.executors import ExecutorConfig, grid_status, run_grid, run_local
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.fault_helpers import WorkerKiller, assert_same_runs, intact_runs

pytestmark = pytest.mark.slow  # end to end: whole grids through the CLI or API


def test_two_worker_processes_store_the_same_runs_bit_for_bit(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    assert run_local(cfg, tmp_path / "seq", "cpu").completed == 7
    pool = run_local(cfg, tmp_path / "pool", "cpu", workers=2)
    assert pool.completed == 7 and not pool.failed
    assert_same_runs(expand(cfg), tmp_path / "seq", tmp_path / "pool")
    record = RunStore(tmp_path / "pool").record(expand(cfg).teachers[0].run_id)
    assert record["torch_threads"] == 1 and record["host"]


def test_a_nan_run_in_a_worker_is_recorded_once_and_its_students_wait(tiny_config, tmp_path):
    # lr 1e30: every run's loss is inf/NaN within its first steps. The teacher fails, once.
    # Students that train without it (SIDDO, RCD) may start beside it on the idle worker and
    # then fail on their own (how many depends on timing); KD never starts: blocked.
    cfg = load_config(tiny_config, ["train.lr=1.0e+30"])
    outcome = run_local(cfg, tmp_path / "out", "cpu", workers=2)
    grid = expand(cfg)
    teacher = grid.teachers[0].run_id
    beside = {s.run_id for s in grid.students if s.condition != "kd"}
    assert teacher in outcome.failed and set(outcome.failed) - {teacher} <= beside
    assert len(outcome.failed) + outcome.blocked == 7 and outcome.completed == 0
    failures = grid_status(tmp_path / "out")["failed_runs"]
    assert sorted(f["run_id"] for f in failures) == sorted(outcome.failed)  # once each
    for failure in failures:
        assert "NaN or inf" in failure["error"] and failure["step"] == 19
        assert failure["kind"] == "error"  # an application error: not retried


def test_a_killed_worker_is_replaced_and_its_run_redone(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=20"])
    killer = WorkerKiller(tmp_path / "out", "teacher")
    killer.start()
    outcome = run_grid(cfg, tmp_path / "out", ExecutorConfig(workers=2), "cpu")
    killer.join()
    assert killer.killed, "the teacher's worker was never seen running"
    states = grid_status(tmp_path / "out")["conditions"]  # which runs, if a run went missing
    assert outcome.completed == 7 and not outcome.failed, (outcome, killer.killed, states)
    assert len(intact_runs(tmp_path / "out")) == 7
    assert not list((tmp_path / "out" / "runs").glob(".tmp-*"))


def test_a_worker_that_dies_more_than_max_retries_is_a_system_failure(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=20"])
    killer = WorkerKiller(tmp_path / "out", "teacher")
    killer.start()
    outcome = run_grid(cfg, tmp_path / "out", ExecutorConfig(workers=2, max_retries=0), "cpu")
    killer.join()
    assert outcome.failed == (killer.killed[0][0],) and outcome.blocked == 6
    (failure,) = grid_status(tmp_path / "out")["failed_runs"]
    assert failure["kind"] == "system" and "WorkerDied" in failure["error"]


def test_a_second_run_on_a_locked_directory_is_a_clear_error(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    with RunStore(out).lock():
        assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another `kdaudit run` (pid {os.getpid()}" in err
        assert "wait for it to finish" in err
    assert not (out / "runs").exists()  # the refused run touched nothing
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu"]) == 0
    assert grid_status(out)["in_progress"] is None  # released


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "slurm"}, "choose one of local, ray"),
        ({"workers": 0}, "workers: must be >= 1"),
        ({"threads": 0}, "threads: must be >= 1"),
        ({"address": "auto"}, "ray executor only"),
    ],
)
def test_executor_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        ExecutorConfig(**options)


def test_cli_executor_flags(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_config), "--out", str(out), "--address", "auto"]) == 2
    assert "ray executor only" in capsys.readouterr().err
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu",
                 "--workers", "2", "--threads", "1", "--max-retries", "1"]) == 0  # fmt: skip
    assert "7 runs completed now" in capsys.readouterr().out
