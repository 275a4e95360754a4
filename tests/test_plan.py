"""kdaudit.plan: your own training loop under the protocol. The oracle is kdaudit's own
engine: the same grid trained by kdaudit.audit() and by a plain loop driven by the plan
(its seeds, sampler and losses) stores the same test logits and the same verdicts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdaudit
from kdaudit.api.own_loop import PairedSampler
from kdaudit.cli import main
from kdaudit.config import ConfigError, TrainConfig
from kdaudit.engine.loop import batch_order
from kdaudit.store import RunStore, StoreLocked

ROOT = Path(__file__).resolve().parents[1]
K = 3
EPOCHS, BATCH, LR = 2, 32, 1e-2


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    flip = torch.rand(n, generator=g) < 0.2  # label noise: the teacher makes mistakes
    return x, torch.where(flip, (y + 1) % K, y)


TRAIN, TEST = _data(240, 0), _data(120, 1)


def net(seed: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, K))


GRID = dict(teacher_seeds=[0], student_seeds=[10, 11, 12], alphas=[0.5],
            temperatures=[2.0], conditions=["siddo", "kd", "rcd"])  # fmt: skip


def _train(run, teacher_train_logits: torch.Tensor | None) -> nn.Module:
    """A plain PyTorch loop that keeps the plan's pairing: init seed, data seed (global RNG),
    the sampler's order cut into batches, the run's loss."""
    torch.manual_seed(run.init_seed)
    model = net(run.init_seed)
    torch.manual_seed(run.data_seed)
    optimizer = torch.optim.Adam(model.parameters(), LR, fused=True)
    sampler = run.sampler(len(TRAIN[0]))
    model.train()
    for _ in range(EPOCHS):
        order = torch.tensor(list(sampler))
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            teacher = teacher_train_logits[idx] if run.needs_teacher else None
            loss = run.loss(model(TRAIN[0][idx]), TRAIN[1][idx], teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def _run_plan(out: Path, stop_after: int | None = None, **grid):
    plan = kdaudit.plan(out, num_classes=K, **{**GRID, **grid})
    teachers = {}
    for i, run in enumerate(plan.pending()):
        if stop_after is not None and i == stop_after:
            break
        if not run.is_teacher and run.teacher_seed not in teachers:
            teachers[run.teacher_seed] = _teacher_logits(run, plan)
        model = _train(run, teachers.get(run.teacher_seed))
        with torch.no_grad():
            run.record(model(TEST[0]), TEST[1])
        if run.is_teacher:
            teachers[run.teacher_seed] = _eval(model, TRAIN[0])
    return plan


def _teacher_logits(run, plan) -> torch.Tensor:
    """A resumed plan retrains its recorded teacher from its seeds (same weights on CPU)."""
    (teacher,) = [r for r in plan.runs() if r.is_teacher and r.teacher_seed == run.teacher_seed]
    return _eval(_train(teacher, None), TRAIN[0])


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def engine_result(tmp_path_factory):
    """The oracle: the same grid trained by kdaudit's own engine."""
    out = tmp_path_factory.mktemp("engine")
    return kdaudit.audit(net, TRAIN, TEST, out=out, epochs=EPOCHS, batch_size=BATCH, lr=LR,
                         device="cpu", **GRID)  # fmt: skip


def _by_label(out: Path) -> dict[str, np.ndarray]:
    runs = RunStore(out).runs
    return {p.name.rsplit("-", 1)[0]: np.load(p / "test_logits.npy") for p in runs.iterdir()
            if not p.name.startswith(".")}  # fmt: skip


def test_a_plan_trained_by_hand_equals_kdaudits_engine(engine_result, tmp_path):
    _run_plan(tmp_path / "plan").close()
    mine, engine = _by_label(tmp_path / "plan"), _by_label(engine_result.out)
    assert sorted(mine) == sorted(engine) and len(mine) == 10
    for label in engine:
        np.testing.assert_array_equal(mine[label], engine[label], err_msg=label)
    result = kdaudit.api.report(tmp_path / "plan")
    functional = ["activation_distance", "js_divergence", "prediction_disagreement",
                  "rank_disagreement", "accuracy", "loss", "correct_agreement"]  # fmt: skip
    keys = ["condition", "student_seed", "metric"]
    a = result.runs[result.runs.metric.isin(functional)].set_index(keys).value.sort_index()
    b = engine_result.runs[engine_result.runs.metric.isin(functional)].set_index(keys)
    np.testing.assert_array_equal(a.to_numpy(), b.value.sort_index().to_numpy())
    assert result.verdict_lines() and result.verdict_lines() == engine_result.verdict_lines()


def test_the_sampler_is_the_engines_batch_order_epoch_after_epoch():
    cfg = TrainConfig(batch_size=7, epochs=3)
    engine = torch.cat(list(batch_order(50, cfg, seed=12)))  # the engine's minibatches

    sampler = PairedSampler(50, 12)
    mine = torch.tensor([i for _ in range(3) for i in sampler])
    assert torch.equal(engine, mine)
    assert list(PairedSampler(50, 12)) == mine[:50].tolist()  # a new sampler: epoch 1 again


def test_runs_are_paired_as_kdaudit_run_pairs_them(tmp_path):
    with kdaudit.plan(tmp_path / "self", num_classes=K, **GRID) as plan:
        runs = plan.runs()
    teacher = [r for r in runs if r.is_teacher][0]
    assert (teacher.init_seed, teacher.data_seed) == (0, 0)
    for r in runs[1:]:  # self-distillation: the teacher's init, the student seed's data order
        assert (r.init_seed, r.data_seed, r.teacher_seed) == (0, r.student_seed, 0)
        assert r.sampler(10).seed == r.student_seed
    with kdaudit.plan(tmp_path / "other", num_classes=K, same_architecture=False,
                      **GRID) as plan:  # fmt: skip
        assert all(r.init_seed == r.student_seed for r in plan.runs() if not r.is_teacher)
    kd = [r for r in runs if r.condition == "kd"][0]
    assert (kd.alpha, kd.temperature, kd.needs_teacher) == (0.5, 2.0, True)
    assert kd.run_id.startswith("kd_a0.5_T2_t0_s10-")


def _reference_loss(z, y, zt, condition, alpha, temperature):
    """PROTOCOL section 2, written out: (1 - a) CE + a T^2 KL(target || softmax(z / T))."""
    z, zt = z.double(), None if zt is None else zt.double()
    ce = F.cross_entropy(z, y)
    if condition == "siddo":
        return ce
    log_q = F.log_softmax(z / temperature, -1)
    if condition == "kd":
        p = F.softmax(zt / temperature, -1)
    else:  # rcd: the uniform target
        p = torch.full_like(log_q, 1.0 / z.shape[-1])
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@pytest.mark.parametrize("condition", ["siddo", "kd", "rcd"])
def test_the_loss_of_a_language_model_batch_is_the_protocols(tmp_path, condition):
    v = 11
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, v, generator=g, requires_grad=True)  # (N, T, V)
    zt = torch.randn(4, 6, v, generator=g)
    y = torch.randint(v, (4, 6), generator=g)
    y[0, :2] = -100  # positions without a target (padding), left out
    with kdaudit.plan(tmp_path, num_classes=v, **{**GRID, "alphas": [0.3]}) as plan:
        (run,) = [r for r in plan.runs() if r.condition == condition and r.student_seed == 10]
        loss = run.loss(z, y, zt if condition == "kd" else None)
    keep = y.reshape(-1) != -100
    expected = _reference_loss(z.reshape(-1, v)[keep], y.reshape(-1)[keep],
                               zt.reshape(-1, v)[keep], condition, 0.3, 2.0)  # fmt: skip
    assert loss.dim() == 0 and loss.requires_grad
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_bad_calls_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="fmkd matches features"):
        kdaudit.plan(tmp_path / "f", num_classes=K, **{**GRID, "conditions": ["siddo", "fmkd"]})
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        kdaudit.plan(tmp_path / "k", num_classes=1, **GRID)
    plan = kdaudit.plan(tmp_path / "p", num_classes=K, **GRID)
    with pytest.raises(StoreLocked, match="held by an earlier plan of this process"):
        kdaudit.plan(tmp_path / "p", num_classes=K, **GRID)
    runs = plan.runs()
    kd = [r for r in runs if r.condition == "kd"][0]
    z = torch.zeros(5, K)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        kd.loss(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="4 classes, the plan num_classes=3"):
        kd.loss(torch.zeros(5, 4), torch.zeros(5, dtype=torch.long), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="teacher \\(seed 0\\) is not recorded yet"):
        kd.record(z, torch.zeros(5, dtype=torch.long))
    plan.record_teacher(0, z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="test labels differ from those recorded before"):
        kd.record(z, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="recorded already with other test outputs"):
        plan.record_teacher(0, z + 1, torch.zeros(5, dtype=torch.long))
    plan.record_teacher(0, z, torch.zeros(5, dtype=torch.long))  # the same again: a no-op
    with pytest.raises(ConfigError, match="no teacher seed 7"):
        plan.record_teacher(7, z, torch.zeros(5, dtype=torch.long))
    plan.close()


_CRASH = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests import test_plan as t
plan = t.kdaudit.plan({out!r}, num_classes=t.K, **t.GRID)
teachers = {{}}
for i, run in enumerate(plan.pending()):
    if i == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-grid, run in flight
    model = t._train(run, teachers.get(run.teacher_seed))
    run.record(t._eval(model, t.TEST[0]), t.TEST[1])
    if run.is_teacher:
        teachers[run.teacher_seed] = t._eval(model, t.TRAIN[0])
"""


def test_a_plan_killed_mid_grid_resumes_to_the_uninterrupted_result(engine_result, tmp_path):
    out = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", _CRASH.format(root=str(ROOT), out=str(out))],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    assert len(list(RunStore(out).runs.iterdir())) == 4  # the teacher and 3 students
    assert main(["status", str(out)]) == 0  # an ordinary run directory
    plan = _run_plan(out)  # the lock died with the process: resumes
    assert sum(1 for _ in plan.pending()) == 0
    plan.close()
    mine, engine = _by_label(out), _by_label(engine_result.out)
    assert sorted(mine) == sorted(engine)
    for label in engine:
        np.testing.assert_array_equal(mine[label], engine[label], err_msg=label)
    assert main(["report", str(out)]) == 0


def test_import_kdaudit_stays_light_and_plan_is_exported():
    code = ("import sys, kdaudit; light = 'torch' not in sys.modules; kdaudit.plan; "
            "print(light, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    assert out.stdout.split() == ["True", "True"]
