"""Your own KD loss as a treatment: named in a config or passed to kdaudit.audit(), trained on
the same paired seeds and batches as KD, tested against SIDDO and RCD, reported under its own
name; and a one-line error for each way a loss can be wrong."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdaudit
from kdaudit import api
from kdaudit.conditions import CONDITIONS, LossConditionConfig, loss_condition
from kdaudit.conditions.objectives import Batch, build_objective
from kdaudit.config import ConfigError, ProtocolConfig, TrainConfig, load_config
from kdaudit.errors import UserCodeError
from kdaudit.executors import ExecutorConfig, run_grid
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import write_config

OWN = {"factory": "tests.test_own_loss:reverse_kl", "name": "rkd"}


def reverse_kl(student_logits, teacher_logits, labels, alpha, temperature):
    """(1 - a) CE + a T^2 KL(student || teacher), batchmean."""
    ce = F.cross_entropy(student_logits, labels)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def per_example(student_logits, teacher_logits, labels, alpha, temperature):
    return F.cross_entropy(student_logits, labels, reduction="none")  # (B,): not reduced


def nan_loss(student_logits, teacher_logits, labels, alpha, temperature):
    return F.cross_entropy(student_logits, labels) + torch.sqrt(-teacher_logits.abs().sum() - 1)


def two_arguments(student_logits, labels):
    return F.cross_entropy(student_logits, labels)


def detached(student_logits, teacher_logits, labels, alpha, temperature):
    return F.cross_entropy(student_logits, labels).detach()


def _config(tmp_path, conditions, alphas=(0.5,)):
    protocol = {"conditions": list(conditions), "alphas": list(alphas)}
    return write_config(tmp_path, protocol=protocol)


@pytest.mark.slow
def test_own_loss_is_audited_beside_kd_under_its_own_name(tmp_path):
    result = api.run(_config(tmp_path, ["siddo", "kd", "rcd", OWN]), tmp_path / "out",
                     device="cpu")  # fmt: skip
    assert not result.outcome.failed and result.outcome.completed == 1 + 2 * 4
    verdicts = result.verdicts.set_index("condition")
    assert set(verdicts.index) == {"kd", "rkd"}
    rkd = next(s for s in result.analysis.settings if s.condition == "rkd")
    assert rkd.verdict_controls == ("siddo", "rcd") and rkd.comparison("rcd").n == 2
    lines = result.verdict_lines()
    # two paired seeds: no verdict either way, said under its own name
    start = "Teacher seed 0, RKD alpha=0.5, T=1: no verdict, too few paired seeds"
    assert any(line.startswith(start) for line in lines)
    html = (result.report.parent / "index.html").read_text()
    assert "tests.test_own_loss:reverse_kl" in html  # the protocol note names the loss
    spec = next(s for s in expand(load_config(tmp_path / "config.yaml")).students
                if s.condition == "rkd")  # fmt: skip
    assert spec.loss == "tests.test_own_loss:reverse_kl"


@pytest.mark.slow
def test_own_loss_at_alpha_zero_reproduces_siddo_bit_for_bit(tmp_path):
    """Same init, batches and RNG draws as SIDDO: with its teacher term off, the user's
    loss trains exactly the SIDDO model, in this process and in worker processes."""
    cfg = load_config(_config(tmp_path, ["siddo", OWN], alphas=(0.0,)))
    for executor in (ExecutorConfig(), ExecutorConfig(workers=2)):
        out = tmp_path / f"out-{executor.workers}"
        run_grid(cfg, out, executor, "cpu")
        store, grid = RunStore(out), expand(cfg)
        for seed in (10, 11):
            logits = {s.condition: np.asarray(store.array(s.run_id, "test_logits"))
                      for s in grid.students if s.student_seed == seed}  # fmt: skip
            np.testing.assert_array_equal(logits["rkd"], logits["siddo"])


def test_other_runs_keep_their_ids_when_a_loss_is_added(tmp_path):
    plain = expand(load_config(_config(tmp_path, ["siddo", "kd", "rcd"])))
    more = expand(load_config(_config(tmp_path, ["siddo", "kd", "rcd", OWN])))
    assert {s.run_id for s in plain.runs} < {s.run_id for s in more.runs}


@pytest.mark.parametrize(
    "factory, message",
    [
        ("tests.test_own_loss:two_arguments", r"cannot be called as fn\(student_logits, "
         r"teacher_logits, labels, alpha, temperature\)"),
        ("tests.test_own_loss:per_example", r"returned shape \(8,\) on random logits, not a "
         r"scalar; reduce it"),
        ("tests.test_own_loss:nan_loss", r"returned nan on random logits; check it for log\(0\)"),
        ("tests.test_own_loss:detached", r"without gradient"),
        ("tests.test_own_loss:missing", r"has no attribute 'missing'"),
        ("nowhere_at_all:loss", r"cannot import module 'nowhere_at_all'"),
    ],
)  # fmt: skip
def test_a_wrong_loss_is_one_line_before_any_run(tmp_path, factory, message):
    # a name of its own per case (conditions stay registered in the process; a string's
    # hash changes from run to run, so names from hash() could collide)
    own = {"factory": factory, "name": f"bad_{factory.split(':')[-1]}"}
    with pytest.raises(UserCodeError, match=message) as err:
        api.run(_config(tmp_path, ["siddo", "rcd", own]), tmp_path / "out", device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_loss_that_goes_nan_on_the_first_training_batch_says_so():
    entry = loss_condition(LossConditionConfig("tests.test_own_loss:reverse_kl", "rkd_nan"))
    targets = lambda batch: torch.full((4, 3), float("nan"))  # noqa: E731
    objective = build_objective(entry.name, 0.5, 1.0, 3, targets)
    batch = Batch(torch.arange(4), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserCodeError, match="returned nan on the first batch"):
        objective(torch.zeros(4, 3, requires_grad=True), batch)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"factory": "tests.test_own_loss:reverse_kl", "name": "kd"}, "the name 'kd' is taken"),
        ({"factory": "tests.test_own_loss:reverse_kl", "name": "x", "controls": ["nope"]},
         "unknown control 'nope'"),
        ({"name": "x"}, "your own loss needs 'factory'"),
        ({"factory": "a:b", "name": "x", "colour": 1}, "neither a condition name nor your own"),
        ("kdd", "'kdd' is not allowed; choose one of"),
    ],
)  # fmt: skip
def test_a_wrong_condition_entry_is_a_config_error(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, ["siddo", "rcd", entry]))


def test_audit_takes_own_losses_and_typed_configs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(dim=1)

    def net(seed):
        return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))

    protocol = ProtocolConfig(teacher_seeds=(0,), student_seeds=(10, 11), alphas=(0.5,),
                              conditions=("siddo", "rcd", OWN))  # fmt: skip
    result = kdaudit.audit(net, (x[:120], y[:120]), (x[120:], y[120:]), out=tmp_path / "out",
                           protocol=protocol, training=TrainConfig(epochs=2, batch_size=32),
                           device="cpu")  # fmt: skip
    assert set(result.verdicts["condition"]) == {"rkd"} and not result.outcome.failed
    assert CONDITIONS.get("rkd").loss == OWN["factory"]
    with pytest.raises(ConfigError, match="unknown keyword 'epoch'; allowed: "):
        kdaudit.audit(net, (x, y), (x, y), out=tmp_path / "o2", epoch=3)
