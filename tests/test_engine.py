"""Running a grid: the store, resuming, determinism, failures, kills, status, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kdaudit.cli import main
from kdaudit.conditions import objectives as conditions
from kdaudit.config import load_config
from kdaudit.engine import run as runner
from kdaudit.executors import grid_status, run_local
from kdaudit.protocol import expand
from kdaudit.store import RunStore


def _complete(out):
    runs = out / "runs"
    return (
        sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
        if runs.is_dir()
        else []
    )


def test_a_run_directory_holds_config_record_and_logits(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["store.save_weights=true"])
    outcome = run_local(cfg, tmp_path / "out", "cpu")
    assert outcome.total == 7 and outcome.completed == 7 and not outcome.failed
    store, grid = RunStore(tmp_path / "out"), expand(cfg)
    teacher, student = grid.teachers[0], grid.students[0]
    for spec in grid.runs:
        d = tmp_path / "out" / "runs" / spec.run_id
        assert {"spec.json", "record.json", "test_logits.npy", "weights.safetensors"} <= {
            p.name for p in d.iterdir()
        }
        assert json.loads((d / "spec.json").read_text())["condition"] == spec.condition
    logits = store.array(student.run_id, "test_logits")
    assert logits.shape == (120, 10) and logits.dtype == np.float32
    assert store.array(teacher.run_id, "train_logits").shape == (300, 10)
    record = store.record(student.run_id)
    assert 0 <= record["metrics"]["test_accuracy"] <= 1
    assert record["similarity"]["accuracy"] == pytest.approx(record["metrics"]["test_accuracy"])
    assert record["git_commit"] is not None and record["torch"] == torch.__version__


def test_rerunning_skips_complete_runs_and_extending_the_grid_reuses_them(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    run_local(cfg, tmp_path / "out", "cpu")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").iterdir()}
    again = run_local(cfg, tmp_path / "out", "cpu")
    assert again.skipped == 7 and again.completed == 0
    more = run_local(load_config(tiny_config, ["protocol.student_seeds=[10, 11, 12]"]),
                     tmp_path / "out", "cpu")  # fmt: skip
    assert more.skipped == 7 and more.completed == 3
    for name, stamp in stamps.items():
        assert (tmp_path / "out" / "runs" / name).stat().st_mtime_ns == stamp


def test_the_same_run_twice_gives_bit_identical_logits(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    run_local(cfg, tmp_path / "a", "cpu")
    run_local(cfg, tmp_path / "b", "cpu")
    for spec in expand(cfg).runs:
        a = RunStore(tmp_path / "a").array(spec.run_id, "test_logits")
        b = RunStore(tmp_path / "b").array(spec.run_id, "test_logits")
        np.testing.assert_array_equal(a, b)


def test_a_nan_loss_is_recorded_as_failed_and_the_grid_goes_on(tiny_config, tmp_path, monkeypatch):
    original = conditions.build_objective

    def poisoned(name, *args, **kwargs):
        objective = original(name, *args, **kwargs)
        return (lambda z, batch: objective(z, batch) * float("nan")) if name == "kd" else objective

    monkeypatch.setattr("kdaudit.engine.run.build_objective", poisoned)
    cfg = load_config(tiny_config)
    outcome = run_local(cfg, tmp_path / "out", "cpu")
    assert len(outcome.failed) == 2 and outcome.completed == 5
    status = grid_status(tmp_path / "out")
    assert status["conditions"]["kd"] == {"complete": 0, "failed": 2, "blocked": 0, "pending": 0}
    assert "NaN or inf between steps" in status["failed_runs"][0]["error"]
    assert status["failed_runs"][0]["step"] == 19  # checked at the end of the 20 steps
    # not retried by default; retried (and now fine) with retry_failed
    monkeypatch.setattr("kdaudit.engine.run.build_objective", original)
    assert run_local(cfg, tmp_path / "out", "cpu").completed == 0
    assert run_local(cfg, tmp_path / "out", "cpu", retry_failed=True).completed == 2
    assert grid_status(tmp_path / "out")["failed"] == 0


def test_students_of_a_failed_teacher_wait_for_it(tiny_config, tmp_path, monkeypatch):
    """A failed teacher blocks its students without recording them as failed, so that
    retrying the teacher runs them too."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    real_train = runner.train_one
    monkeypatch.setattr("kdaudit.engine.run.train_one", broken)
    cfg = load_config(tiny_config)
    outcome = run_local(cfg, tmp_path / "out", "cpu")
    assert len(outcome.failed) == 1 and outcome.blocked == 6 and outcome.completed == 0
    status = grid_status(tmp_path / "out")
    assert status["failed_runs"][0]["error"] == "RuntimeError: boom"
    assert status["conditions"]["kd"]["blocked"] == 2
    monkeypatch.setattr("kdaudit.engine.run.train_one", real_train)
    assert run_local(cfg, tmp_path / "out", "cpu").completed == 0  # failures need a retry
    assert run_local(cfg, tmp_path / "out", "cpu", retry_failed=True).completed == 7


def test_a_crash_while_writing_leaves_no_half_written_run(tiny_config, tmp_path, monkeypatch):
    cfg = load_config(tiny_config)
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(path, array):
        calls["n"] += 1
        if calls["n"] == 3:  # the second run's first array
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr("kdaudit.store.np.save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, tmp_path / "out", "cpu")
    assert len(_complete(tmp_path / "out")) == 1
    assert not list((tmp_path / "out" / "runs").glob(".tmp-*"))
    monkeypatch.setattr("kdaudit.store.np.save", real_save)
    assert run_local(cfg, tmp_path / "out", "cpu").completed == 6


@pytest.mark.slow
def test_kill_9_loses_at_most_the_run_in_flight(tiny_config, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kdaudit.cli", "run", str(tiny_config), "--out", str(out),
           "--device", "cpu", "--set", "train.epochs=100"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    deadline = time.time() + 120
    while len(_complete(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {
        name: (out / "runs" / name / "record.json").stat().st_mtime_ns for name in _complete(out)
    }
    assert 2 <= len(before) < 7
    for name in before:  # every run directory that exists is complete and readable
        assert json.loads((out / "runs" / name / "record.json").read_text())["status"] == "complete"
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu",
                 "--set", "train.epochs=100"]) == 0  # fmt: skip
    assert len(_complete(out)) == 7 and not list((out / "runs").glob(".tmp-*"))
    for name, stamp in before.items():  # nothing complete was redone
        assert (out / "runs" / name / "record.json").stat().st_mtime_ns == stamp


def test_cli_run_status_report(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_config), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "7 runs completed now" in printed and "teacher seed 0: test accuracy" in printed
    # two paired seeds: no verdict either way (a one-sided exact test needs five)
    assert "KD alpha=0.5, T=1 (teacher seed 0): no verdict: too few paired seeds" in printed
    assert "report/index.html" in printed
    assert (out / "report" / "index.html").is_file()
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["complete"] == 7 and status["conditions"]["kd"]["complete"] == 2
    assert main(["status", str(out)]) == 0
    assert "7 complete, 0 pending, 0 failed, 0 blocked" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0


def test_cli_errors_are_one_clear_line(tiny_config, tmp_path, capsys):
    assert main(["run", str(tiny_config), "--set", "train.lrr=1", "--out", str(tmp_path)]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "holds no experiment.yaml" in capsys.readouterr().err


def test_smoke_flag_runs_a_small_grid(tiny_config, tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["run", str(tiny_config), "--smoke", "--out", str(out), "--device", "cpu",
                 "--set", "protocol.student_seeds=[10, 11, 12]"]) == 0  # fmt: skip
    assert grid_status(out)["total"] == 7  # 3 student seeds shrunk to 2


def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_config, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(tiny_config), "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
