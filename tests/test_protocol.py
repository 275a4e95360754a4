"""Seeds and pairing (PROTOCOL section 3): same init and same minibatches across conditions."""

import numpy as np
import pytest
import torch

from kdaudit.config import load_config
from kdaudit.data import load_data
from kdaudit.engine.loop import batch_order, total_steps
from kdaudit.engine.run import execute
from kdaudit.engine.teachers import Teachers
from kdaudit.executors import run_local
from kdaudit.models import MODELS, build_model
from kdaudit.protocol import expand, smoke
from kdaudit.store import RunStore
from tests.conftest import write_config


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grid_size_and_order(tiny_config):
    cfg = load_config(tiny_config, ["protocol.alphas=[0.1, 0.5, 0.9]",
                                    "protocol.conditions=[siddo, kd, rcd, ls]"])  # fmt: skip
    grid = expand(cfg)
    # per student seed: 1 siddo + 3 kd + 3 rcd + 3 ls
    assert len(grid.teachers) == 1 and len(grid.students) == 2 * 10
    assert grid.runs[0].is_teacher
    assert len({r.run_id for r in grid.runs}) == len(grid.runs)
    assert all(s.teacher_id == grid.teachers[0].run_id for s in grid.students)


def test_self_distillation_students_start_bit_identical_to_the_teacher(tiny_config):
    cfg = load_config(tiny_config, ["protocol.conditions=[siddo, kd, rcd, ls]"])
    grid = expand(cfg)
    data = load_data(cfg.data)
    init = lambda spec: _state(build_model(spec.model, data.input_shape, 10, spec.init_seed))  # noqa: E731
    teacher_init = init(grid.teachers[0])
    torch.manual_seed(12345)  # the global RNG state must not matter
    for student in grid.students:
        assert student.init_seed == grid.teachers[0].init_seed
        assert _same_weights(init(student), teacher_init)


def test_smaller_students_share_their_own_init_per_student_seed(tmp_path):
    cfg = load_config(
        write_config(tmp_path, protocol={"student_model": {"name": "mlp", "width": 8}})
    )
    grid = expand(cfg)
    assert not cfg.self_distillation
    by_seed = {}
    for s in grid.students:
        assert s.model.width == 8 and s.init_seed == s.student_seed
        by_seed.setdefault(s.student_seed, set()).add(s.init_seed)
    assert all(len(v) == 1 for v in by_seed.values())
    a = build_model(grid.students[0].model, (1, 40), 10, 10)
    b = build_model(grid.students[0].model, (1, 40), 10, 11)
    assert not _same_weights(_state(a), _state(b))


def test_build_model_depends_on_the_seed_only():
    cfg = MODELS.get("cnn1d").config()
    torch.manual_seed(1)
    a = _state(build_model(cfg, (1, 40), 10, 7))
    torch.manual_seed(2)
    torch.rand(100)
    b = _state(build_model(cfg, (1, 40), 10, 7))
    assert _same_weights(a, b)
    assert not _same_weights(a, _state(build_model(cfg, (1, 40), 10, 8)))


def test_batch_order_is_a_pure_function_of_the_seed(tiny_config):
    train = load_config(tiny_config).train
    order = lambda seed: torch.cat(list(batch_order(300, train, seed)))  # noqa: E731
    assert torch.equal(order(10), order(10))
    assert not torch.equal(order(10), order(11))
    first_epoch = order(10)[:300]
    assert sorted(first_epoch.tolist()) == list(range(300))  # each example once per epoch
    assert len(list(batch_order(300, train, 10))) == total_steps(300, train) == 2 * 10


def test_every_condition_of_a_student_seed_sees_the_same_minibatches(tiny_config, tmp_path):
    """Record the indices the training loop actually used, per run, through its step hook."""
    cfg = load_config(tiny_config, ["protocol.conditions=[siddo, kd, rcd, ls]"])
    grid = expand(cfg)
    store = RunStore(tmp_path / "out")
    data = load_data(cfg.data)
    teachers = Teachers(store, torch.device("cpu"))
    seen: dict[str, list] = {}
    for spec in grid.runs:
        batches = seen.setdefault(spec.run_id, [])
        execute(
            spec,
            data,
            store,
            teachers,
            on_step=lambda s, idx, loss, b=batches: b.append(idx.clone()),
        )
    orders = {}
    for spec in grid.students:
        orders.setdefault(spec.student_seed, []).append(torch.cat(seen[spec.run_id]))
    for seed_orders in orders.values():
        assert len(seed_orders) == 4
        assert all(torch.equal(o, seed_orders[0]) for o in seed_orders)
    assert not torch.equal(orders[10][0], orders[11][0])


def test_alpha_zero_kd_rcd_ls_reproduce_siddo_bit_for_bit(tiny_config, tmp_path):
    """With alpha = 0 the teacher term vanishes: if init, batches and RNG draws are truly
    paired, KD, RCD and LS must train exactly the SIDDO model, at T = 1 (the default) and 2."""
    cfg = load_config(tiny_config, ["protocol.alphas=[0.0]", "protocol.temperatures=[1.0, 2.0]",
                                    "protocol.conditions=[siddo, kd, rcd, ls]"])  # fmt: skip
    out = tmp_path / "out"
    run_local(cfg, out, "cpu")
    store, grid = RunStore(out), expand(cfg)
    for seed in (10, 11):
        logits = {(s.condition, s.temperature): np.asarray(store.array(s.run_id, "test_logits"))
                  for s in grid.students if s.student_seed == seed}  # fmt: skip
        siddo = next(v for (name, _), v in logits.items() if name == "siddo")
        others = [key for key in logits if key[0] != "siddo"]
        assert {key for key in others if key[0] != "ls"} == {
            (c, t) for c in ("kd", "rcd") for t in (1.0, 2.0)}  # fmt: skip
        for key in others:
            np.testing.assert_array_equal(logits[key], siddo, err_msg=str(key))


def test_smoke_shrinks_grid_and_steps(tiny_config):
    cfg = load_config(tiny_config, ["protocol.teacher_seeds=[0, 1]",
                                    "protocol.student_seeds=[10, 11, 12]"])  # fmt: skip
    small = smoke(cfg)
    assert small.protocol.teacher_seeds == (0,) and small.protocol.student_seeds == (10, 11)
    assert small.train.max_steps == 40
    assert set(small.protocol.conditions) == set(cfg.protocol.conditions)
    with pytest.raises(AssertionError):
        assert expand(small) == expand(cfg)


def test_disdo_starts_from_its_own_init_and_follows_the_teachers_data_order(tiny_config, tmp_path):
    """DISDO (PROTOCOL section 10): initialised from the student seed, trained on the
    teacher's minibatch order; checked on the indices the loop actually used."""
    cfg = load_config(tiny_config, ["protocol.conditions=[siddo, kd, disdo]"])
    grid = expand(cfg)
    (teacher,) = grid.teachers
    disdo = [s for s in grid.students if s.condition == "disdo"]
    assert [s.student_seed for s in disdo] == [10, 11]
    assert all(s.init_seed == s.student_seed and s.data_seed == teacher.data_seed for s in disdo)
    others = [s for s in grid.students if s.condition != "disdo"]
    assert all(s.init_seed == teacher.init_seed and s.data_seed == s.student_seed for s in others)
    data = load_data(cfg.data)
    init = lambda spec: _state(build_model(spec.model, data.input_shape, 10, spec.init_seed))  # noqa: E731
    assert not _same_weights(init(disdo[0]), init(teacher))
    assert not _same_weights(init(disdo[0]), init(disdo[1]))
    store, teachers = RunStore(tmp_path / "out"), Teachers(RunStore(tmp_path / "out"), "cpu")
    seen: dict[str, list] = {}
    for spec in (teacher, *disdo):
        batches = seen.setdefault(spec.run_id, [])
        execute(spec, data, store, teachers,
                on_step=lambda s, idx, loss, b=batches: b.append(idx.clone()))  # fmt: skip
    teacher_order = torch.cat(seen[teacher.run_id])
    assert all(torch.equal(torch.cat(seen[s.run_id]), teacher_order) for s in disdo)


def test_disdo_is_refused_outside_self_distillation(tmp_path):
    from kdaudit.errors import ConfigError

    path = write_config(tmp_path, protocol={"student_model": {"name": "mlp", "width": 8},
                                            "conditions": ["siddo", "kd", "rcd", "disdo"]})  # fmt: skip
    with pytest.raises(ConfigError, match="disdo is a self-distillation control"):
        load_config(path)
