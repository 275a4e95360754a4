"""Using the whole machine by default: how many worker processes the local executor starts,
their progress display, the optimizer step without torch.optim's bookkeeping, and the
default grid's results against one run at a time, bit for bit."""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdaudit.config import TrainConfig, load_config
from kdaudit.engine import teachers as teachers_module
from kdaudit.engine.loop import Update, make_optimizer, make_schedule
from kdaudit.executors import ExecutorConfig, local_stack, run_grid
from kdaudit.executors.core import (
    RunContext,
    RunResult,
    attempt,
    blocked,
    cpu_count,
    release_worker_state,
    stacks,
    trains_without_teacher,
)
from kdaudit.executors.local import (
    POOL_MIN_STEPS,
    _early,
    _finished,
    _requeue,
    local_workers,
    units,
)
from kdaudit.executors.progress import Lanes
from kdaudit.protocol import TeacherPlan, expand
from kdaudit.store import RunStore
from tests.conftest import write_config
from tests.fault_helpers import assert_same_runs

# the tiny grid trained for enough steps that the default starts worker processes
BIG = ["train.epochs=200"]


def _ctx(device="cpu") -> RunContext:
    return RunContext(out="out", device=device, threads=1, data_dir=None, grid_token="t")


def _step(loss: torch.Tensor, stepper) -> None:
    """One update, by kdaudit's Update or by the torch.optim optimizer as torch documents it."""
    if isinstance(stepper, Update):
        stepper.zero_grad()
    else:
        stepper.zero_grad(set_to_none=True)
    loss.backward()
    stepper.step()


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_direct_fused_step_equals_torch_optim_bit_for_bit(optimizer, schedule):
    cfg = TrainConfig(optimizer=optimizer, schedule=schedule, lr=0.01, weight_decay=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    params = {}
    for direct in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = make_optimizer(model.parameters(), cfg)
        sched, update = make_schedule(opt, cfg, 30), Update(opt)
        assert update.kernel is not None  # make_optimizer's Adam is fused: the direct path
        for step in range(30):
            loss = torch.nn.functional.cross_entropy(model(x[step % 4 :: 4]), y[step % 4 :: 4])
            _step(loss, update if direct else opt)
            if sched is not None:
                sched.step()
        params[direct] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(params[False], params[True], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(params[True][0], torch.zeros_like(params[True][0]))


def test_an_optimizer_the_kernel_does_not_cover_steps_through_torch_optim():
    p = torch.nn.Parameter(torch.ones(3))
    assert Update(torch.optim.SGD([p], 0.1)).kernel is None
    assert Update(torch.optim.Adam([p], 0.1, amsgrad=True, fused=True)).kernel is None
    assert Update(torch.optim.Adam([p], 0.1)).kernel is None  # not fused


def test_the_default_is_one_worker_per_core_and_workers_1_runs_here(tiny_config):
    cfg = load_config(tiny_config, BIG)
    todo = expand(cfg).runs
    assert local_workers(todo, _ctx(), ExecutorConfig()) == min(cpu_count(), len(todo))
    assert local_workers(todo, _ctx(), ExecutorConfig(workers=1)) == 1
    assert local_workers(todo, _ctx(), ExecutorConfig(workers=3)) == 3
    assert local_workers(todo, _ctx(), ExecutorConfig(threads=cpu_count())) == 1
    assert local_workers(todo, _ctx(), ExecutorConfig(stack=4)) == 1
    assert local_workers(todo[:1], _ctx(), ExecutorConfig()) == 1  # never more than the runs


def test_small_grids_and_objects_in_memory_run_in_this_process(tiny_config):
    tiny = expand(load_config(tiny_config)).runs  # 7 runs of 20 steps
    assert sum(s.train.epochs * 10 for s in tiny) < POOL_MIN_STEPS
    assert local_workers(tiny, _ctx(), ExecutorConfig()) == 1
    big = expand(load_config(tiny_config, BIG)).runs
    in_memory = [replace(s, model=replace(s.model, name="in_memory")) for s in big]
    assert local_workers(in_memory, _ctx(), ExecutorConfig()) == 1


def test_one_worker_per_gpu(tiny_config, monkeypatch):
    todo = expand(load_config(tiny_config, BIG)).runs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert local_workers(todo, _ctx("cuda"), ExecutorConfig()) == 3
    assert local_workers(todo, _ctx("cuda:1"), ExecutorConfig()) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_workers(todo, _ctx("cuda"), ExecutorConfig()) == 1


class Recorder:
    def __init__(self):
        self.calls = []

    def start_run(self, spec, steps, lane=0):
        self.calls.append(("start", lane, spec, steps))

    def show(self, lane, step, loss):
        self.calls.append(("show", lane, step, loss))


def test_each_worker_s_run_reaches_the_display_through_its_lane():
    lanes, shown = Lanes(2), Recorder()
    runs = ["run a", "run b", "run c"]
    first, second = lanes.writer(0), lanes.writer(1)
    first.number, second.number = 0, 2
    first.start_run(runs[0], 100)
    second.start_run(runs[2], 50)
    first.step(9, None, torch.tensor(1.5))
    lanes.poll(runs, shown)
    assert shown.calls[0] == ("start", 0, "run a", 100)
    assert shown.calls[1] == ("show", 0, 9, 1.5)
    assert shown.calls[2] == ("start", 1, "run c", 50)  # started, no step yet
    lanes.poll(runs, shown)
    assert len(shown.calls) == 3  # nothing moved: nothing shown again
    first.number = 1
    first.start_run(runs[1], 80)
    first.step(0, None, torch.tensor(2.0))
    lanes.poll(runs, shown)
    assert shown.calls[3] == ("start", 0, "run b", 80)
    assert shown.calls[4][:3] == ("show", 0, 0)


@pytest.mark.slow
def test_the_default_stores_the_same_runs_as_one_at_a_time_bit_for_bit(tiny_config, tmp_path):
    cfg = load_config(tiny_config, BIG)
    shown = Recorder()
    shown.start_grid = shown.end_grid = lambda *a: None
    shown.end_run = lambda spec, status: shown.calls.append(("end", spec.run_id, status))
    default = run_grid(cfg, tmp_path / "default", ExecutorConfig(), "cpu", reporter=shown)
    alone = run_grid(cfg, tmp_path / "alone", ExecutorConfig(workers=1), "cpu")
    assert default.completed == alone.completed == 7 and not default.failed
    assert_same_runs(expand(cfg), tmp_path / "alone", tmp_path / "default")
    records = [RunStore(tmp_path / "default").record(s.run_id) for s in expand(cfg).runs]
    assert {r["torch_threads"] for r in records} == {1}
    # the MLP students trained in stacks, the same bits as each alone (a stack of one)
    assert max(r["engine"]["stack"]["size"] for r in records if r["engine"]["stack"]) > 1
    if cpu_count() > 1:  # several workers ran, and the display showed each one's runs
        assert {c[1] for c in shown.calls if c[0] == "start"} == set(range(min(cpu_count(), 7)))
    assert sum(c[0] == "end" for c in shown.calls) == 7


def test_the_direct_step_hands_back_to_torch_optim_when_a_parameter_has_no_gradient():
    """A parameter without a gradient in one step (a branch unused at steps 4 and 8): the
    direct path, taken at steps 1 to 3, hands back to torch.optim with a count per parameter
    again (one shared count would be advanced once per entry of torch's list), and torch.optim
    steps from then on, the counts now differing. Bit for bit torch.optim's update throughout."""
    cfg = TrainConfig(optimizer="adam", lr=0.01)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    params, kernel_calls = {}, []
    for direct in (False, True):
        torch.manual_seed(0)
        trunk, head, spare = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)
        model = torch.nn.ModuleList([trunk, head, spare])
        opt = make_optimizer(model.parameters(), cfg)
        update = Update(opt)
        kernel = update.kernel
        update.kernel = lambda *a, _kernel=kernel, **k: (kernel_calls.append(1), _kernel(*a, **k))
        for step in range(12):
            h = trunk(x).relu()
            loss = torch.nn.functional.cross_entropy(head(h), y)
            if step not in (4, 8):
                loss = loss + torch.nn.functional.cross_entropy(spare(h), y)
            _step(loss, update if direct else opt)
        params[direct] = [p.detach().clone() for p in model.parameters()]
        counts = [float(opt.state[p]["step"]) for p in model.parameters()]
        assert counts == [12, 12, 12, 12, 10, 10]  # every parameter's own count, as torch keeps
    assert len(kernel_calls) == 3  # steps 1 to 3 took the direct path
    for a, b in zip(params[False], params[True], strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------- students beside their teacher


def _grid_ctx(cfg, out) -> RunContext:
    return RunContext(out=str(out), device="cpu", threads=1, data_dir=None, grid_token="g",
                      plan=expand(cfg).plan)  # fmt: skip


def _teacher_arrives(config, source: Path, out: Path, teacher_id: str, after: float,
                     fail: bool = False) -> threading.Thread:  # fmt: skip
    """The teacher of `out`, running now: after `after` seconds its run (copied from the
    complete one in `source`) lands in `out`, or it fails."""
    store = RunStore(out)
    store.mark_running(teacher_id)

    def land():
        time.sleep(after)
        try:
            if fail:
                spec = next(s for s in expand(config).runs if s.run_id == teacher_id)
                store.write_failure(spec, "NonFiniteLoss: test", "", 3)
            else:
                staging = out / f"staging-{teacher_id}"
                shutil.copytree(Path(source) / "runs" / teacher_id, staging)
                store.runs.mkdir(parents=True, exist_ok=True)
                os.replace(staging, store.runs / teacher_id)
        finally:  # the test fails (not hangs) if the teacher could not land
            store.clear_running(teacher_id)

    thread = threading.Thread(target=land)
    thread.start()
    return thread


def test_a_student_trained_beside_its_teacher_waits_for_it_and_equals_one_trained_after(
    tiny_config, tmp_path
):
    """SIDDO started early (while its teacher 'runs' in another thread): it trains, waits
    for the teacher, and is then compared with it: the same record and logits, bit for bit,
    as the same student run after its teacher in the ordinary order."""
    cfg = load_config(tiny_config)
    grid = expand(cfg)
    teacher = grid.teachers[0]
    siddo = next(s for s in grid.students if s.condition == "siddo")
    ordinary = tmp_path / "ordinary"
    run_grid(cfg, ordinary, ExecutorConfig(workers=1), "cpu")
    out = tmp_path / "early"
    RunStore(out).save_experiment(cfg)
    arrival = _teacher_arrives(cfg, ordinary, out, teacher.run_id, after=1.5)
    start = time.monotonic()
    result = attempt(siddo, _grid_ctx(cfg, out), early=True)
    arrival.join()
    release_worker_state()
    assert result.status == "complete" and time.monotonic() - start >= 1.5  # it waited
    early, after = RunStore(out).record(siddo.run_id), RunStore(ordinary).record(siddo.run_id)
    assert early["similarity"] == after["similarity"] and early["metrics"] == after["metrics"]
    np.testing.assert_array_equal(RunStore(out).array(siddo.run_id, "test_logits"),
                                  RunStore(ordinary).array(siddo.run_id, "test_logits"))  # fmt: skip


def test_a_student_beside_a_teacher_that_fails_is_blocked_not_failed(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    grid = expand(cfg)
    teacher, rcd = grid.teachers[0], next(s for s in grid.students if s.condition == "rcd")
    out = tmp_path / "early"
    RunStore(out).save_experiment(cfg)
    arrival = _teacher_arrives(cfg, tmp_path, out, teacher.run_id, after=0.5, fail=True)
    result = attempt(rcd, _grid_ctx(cfg, out), early=True)
    arrival.join()
    release_worker_state()
    store = RunStore(out)
    assert result.status == "blocked"
    assert not store.is_complete(rcd.run_id) and store.failure(rcd.run_id) is None
    assert not store.is_running(rcd.run_id)


def test_a_student_whose_teacher_is_not_running_stops_waiting(tiny_config, tmp_path, monkeypatch):
    """Neither complete, nor failed, nor running (its worker died): blocked after `patience`."""
    cfg = load_config(tiny_config)
    siddo = next(s for s in expand(cfg).students if s.condition == "siddo")
    out = tmp_path / "early"
    RunStore(out).save_experiment(cfg)
    monkeypatch.setattr(teachers_module, "wait_for_teacher",
                        functools.partial(teachers_module.wait_for_teacher, patience=0.3))  # fmt: skip
    result = attempt(siddo, _grid_ctx(cfg, out), early=True)
    release_worker_state()
    assert result.status == "blocked" and not RunStore(out).is_complete(siddo.run_id)


def test_a_stale_mark_of_a_dead_teacher_process_is_not_a_teacher_running(tiny_config, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """The teacher's in-flight mark left by a process that was killed (kill -9 leaves it):
    the early student is blocked after `patience`, not left waiting for ever."""
    cfg = load_config(tiny_config)
    siddo = next(s for s in expand(cfg).students if s.condition == "siddo")
    out = tmp_path / "early"
    store = RunStore(out)
    store.save_experiment(cfg)
    store.mark_running(siddo.teacher_id)
    assert store.is_running(siddo.teacher_id)  # this process: alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mark = store.in_flight / f"{siddo.teacher_id}.json"
    mark.write_text(json.dumps({**json.loads(mark.read_text()), "pid": dead.pid}))
    assert not store.is_running(siddo.teacher_id)
    monkeypatch.setattr(teachers_module, "wait_for_teacher",
                        functools.partial(teachers_module.wait_for_teacher, patience=0.3))  # fmt: skip
    result = attempt(siddo, _grid_ctx(cfg, out), early=True)
    release_worker_state()
    assert result.status == "blocked" and not store.is_complete(siddo.run_id)
    other_host = {**json.loads(mark.read_text()), "host": "elsewhere"}
    mark.write_text(json.dumps(other_host))
    assert store.is_running(siddo.teacher_id)  # only its own host can tell it is gone


def test_the_pool_stacks_mlp_students_on_the_cpu_and_trains_every_other_run_alone(
    tiny_config, tmp_path
):
    grid = expand(load_config(tiny_config))
    teacher, students = grid.teachers[0], grid.students
    cpu = units(list(grid.runs), _ctx())
    assert cpu[0] == (teacher,)  # teachers alone, first
    (stack,) = cpu[1:]  # both seeds' 3 runs: one stack of 6, at most POOL_STACK
    assert sorted(s.run_id for s in stack) == sorted(s.run_id for s in students)
    assert [s.student_seed for s in stack] == [10, 10, 10, 11, 11, 11]  # a seed's together
    assert all(len(unit) == 1 for unit in units(list(grid.runs), _ctx("cuda")))
    cnn = expand(load_config(write_config(tmp_path, model={"name": "cnn1d", "width": 4,
                                                            "depth": 1})))  # fmt: skip
    assert all(len(unit) == 1 for unit in units(list(cnn.runs), _ctx()))


def test_only_kdaudits_mlp_runs_stack_and_never_beside_feature_map_students(tiny_config):
    grid = expand(load_config(tiny_config))
    siddo = grid.students[0]
    assert stacks(siddo, TeacherPlan()) and not stacks(siddo, TeacherPlan(features=True))
    mine = replace(siddo, model=SimpleNamespace(name="in_memory"))  # kdaudit.audit(my_net)
    assert not stacks(mine, TeacherPlan())


def test_only_students_that_train_without_their_teacher_start_early(tiny_config, tmp_path):
    grid = expand(load_config(tiny_config))
    teacher = grid.teachers[0]
    store = RunStore(tmp_path / "out")
    in_flight = {"future": (teacher,)}
    waiting = {teacher.run_id: list(grid.students)}
    gpu = _ctx("cuda")  # one run a unit: nothing stacks off the CPU
    assert _early(waiting, in_flight, 0, store, gpu) == []
    assert _early(waiting, {}, 3, store, gpu) == []  # its teacher is not in flight
    early = _early(waiting, in_flight, 3, store, gpu)
    assert all(len(unit) == 1 for unit in early) and len(early) == 3
    assert {s.condition for (s,) in early} == {"siddo", "rcd"}
    assert [s.condition for s in waiting[teacher.run_id]].count("kd") == 2
    assert all(s not in waiting[teacher.run_id] for (s,) in early)
    # on the CPU the MLP students of both seeds that train without the teacher: one stack
    waiting = {teacher.run_id: list(grid.students)}
    (unit,) = _early(waiting, in_flight, 3, store, _ctx())
    assert sorted((s.condition, s.student_seed) for s in unit) == [
        ("rcd", 10), ("rcd", 11), ("siddo", 10), ("siddo", 11)]  # fmt: skip
    assert [s.condition for s in waiting[teacher.run_id]] == ["kd", "kd"]
    waiting = {teacher.run_id: list(grid.students)}
    store.write_failure(teacher, "an old failure, retried now", "", None)
    assert _early(waiting, in_flight, 3, store, _ctx()) == []  # never beside a failed teacher


def test_an_early_student_lost_with_its_teacher_waits_for_it_again(tiny_config, tmp_path):
    grid = expand(load_config(tiny_config))
    teacher, siddo = grid.teachers[0], grid.students[0]
    store, shown = RunStore(tmp_path / "out"), Recorder()
    shown.end_run = lambda spec, status: shown.calls.append(("end", spec.run_id, status))
    waiting = defaultdict(list)
    assert _requeue([teacher, siddo], store, waiting, shown) == [teacher]
    assert waiting[teacher.run_id] == [siddo] and not shown.calls
    waiting.clear()
    store.write_failure(teacher, "WorkerDied", "", None, kind="system")
    assert _requeue([siddo], store, waiting, shown) == []
    assert shown.calls == [("end", siddo.run_id, blocked(siddo).message)]


def test_an_early_student_that_stopped_waiting_waits_again_unless_its_teacher_failed(
    tiny_config, tmp_path
):
    """A blocked result (an early student that gave up on its teacher) is not the student's
    end: it waits for the teacher again, starts once the teacher is complete, and is blocked
    only if the teacher failed (in CI a dropped one left 4 runs of a grid never run)."""
    grid = expand(load_config(tiny_config))
    teacher, siddo = grid.teachers[0], grid.students[0]
    ctx = replace(_ctx(), out=str(tmp_path / "out"))
    store, shown = RunStore(ctx.out), Recorder()
    shown.end_run = lambda spec, status: shown.calls.append(("end", spec.run_id, status))
    queue, waiting = deque(), defaultdict(list)
    _finished(siddo, blocked(siddo), queue, waiting, shown, ctx)
    assert waiting[teacher.run_id] == [siddo] and not queue and not shown.calls
    _finished(teacher, RunResult(teacher.run_id, "complete", "complete"), queue, waiting, shown,
              ctx)  # fmt: skip
    assert list(queue) == units([siddo], ctx) and not waiting.get(teacher.run_id)
    store.write_failure(teacher, "NonFiniteLoss: test", "", 3)
    _finished(siddo, blocked(siddo), deque(), waiting, shown, ctx)
    assert shown.calls[-1] == ("end", siddo.run_id, blocked(siddo).message)
    assert not waiting.get(teacher.run_id)


def test_an_early_stack_that_cannot_train_as_one_trains_its_runs_alone_still_early(
    tiny_config, tmp_path, monkeypatch
):
    """The early stack's fallback (the stack raised as a whole) trains each run alone as the
    early student it is: it waits for the teacher, not blocked at once; the same bits as the
    ordinary order."""
    cfg = load_config(tiny_config)
    grid = expand(cfg)
    early = [s for s in grid.students if trains_without_teacher(s)]
    ordinary = tmp_path / "ordinary"
    run_grid(cfg, ordinary, ExecutorConfig(workers=1), "cpu")
    out = tmp_path / "early"
    RunStore(out).save_experiment(cfg)
    monkeypatch.setattr(local_stack, "_train_group", lambda *args: None)
    arrival = _teacher_arrives(cfg, ordinary, out, grid.teachers[0].run_id, after=2.0)
    results = local_stack.attempt_stack(early, _grid_ctx(cfg, out), Lanes(1).writer(0), True)
    arrival.join()
    release_worker_state()
    assert [r.status for _, r in results] == ["complete"] * len(early) == ["complete"] * 4
    for spec in early:
        mine, theirs = RunStore(out).record(spec.run_id), RunStore(ordinary).record(spec.run_id)
        assert mine["similarity"] == theirs["similarity"] and mine["metrics"] == theirs["metrics"]
