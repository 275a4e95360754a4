"""The Ray executor on a local cluster: same runs as the local executor, application errors
recorded and not retried, a killed worker's task retried. Skipped when Ray is not installed
(`pip install -e '.[dev]'` installs it, so CI runs these)."""

import importlib.util

import pytest

from kdaudit.cli import main
from kdaudit.config import load_config
from kdaudit.executors import ExecutorConfig, grid_status, run_grid, run_local
from kdaudit.protocol import expand
from tests.fault_helpers import WorkerKiller, assert_same_runs, intact_runs

pytestmark = [
    pytest.mark.slow,  # end to end: grids on a Ray cluster
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="ray is not installed: pip install 'ray>=2.9'",
    ),
]


def test_cli_ray_executor_stores_the_same_runs_as_local(tiny_config, tmp_path, capsys):
    """Runs first in this module: the executor starts its own local cluster and stops it."""
    import ray

    cfg = load_config(tiny_config)
    run_local(cfg, tmp_path / "local", "cpu")
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "ray"), "--device", "cpu",
                 "--executor", "ray", "--workers", "2"]) == 0  # fmt: skip
    assert "7 runs completed now" in capsys.readouterr().out
    assert not ray.is_initialized()
    assert_same_runs(expand(cfg), tmp_path / "local", tmp_path / "ray")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the remaining tests; the executor reuses an initialised Ray."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_records_a_nan_run_as_failed_and_does_not_retry_it(cluster, tiny_config, tmp_path):
    # T = 1e-40: logits / T overflow float32, so every kd and rcd loss is NaN; siddo is fine.
    cfg = load_config(tiny_config, ["protocol.temperatures=[1.0e-40]"])
    outcome = run_grid(cfg, tmp_path / "out", "ray", "cpu")
    assert outcome.completed == 3 and len(outcome.failed) == 4 and outcome.blocked == 0
    status = grid_status(tmp_path / "out")
    assert status["conditions"]["kd"]["failed"] == 2 and status["conditions"]["siddo"]["complete"]
    for failure in status["failed_runs"]:
        assert "NaN or inf" in failure["error"] and failure["step"] == 19
        assert failure["kind"] == "error"


def test_ray_students_of_a_failed_teacher_are_blocked(cluster, tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.lr=1.0e+30"])
    outcome = run_grid(cfg, tmp_path / "out", "ray", "cpu")
    assert len(outcome.failed) == 1 and outcome.blocked == 6 and outcome.completed == 0


def test_ray_retries_the_task_of_a_killed_worker(cluster, tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=20"])
    killer = WorkerKiller(tmp_path / "out", "teacher")
    killer.start()
    outcome = run_grid(cfg, tmp_path / "out", "ray", "cpu")
    killer.join()
    assert killer.killed, "the teacher's task was never seen running"
    assert outcome.completed == 7 and not outcome.failed
    assert len(intact_runs(tmp_path / "out")) == 7
    assert not list((tmp_path / "out" / "runs").glob(".tmp-*"))


def test_ray_worker_deaths_beyond_max_retries_are_a_system_failure(cluster, tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=20"])
    killer = WorkerKiller(tmp_path / "out", "teacher")
    killer.start()
    outcome = run_grid(cfg, tmp_path / "out", ExecutorConfig("ray", max_retries=0), "cpu")
    killer.join()
    assert outcome.failed == (killer.killed[0][0],) and outcome.blocked == 6
    (failure,) = grid_status(tmp_path / "out")["failed_runs"]
    assert failure["kind"] == "system" and "WorkerCrashedError" in failure["error"]
