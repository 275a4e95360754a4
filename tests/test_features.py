"""Feature-map matching KD (fmkd) and its control (fmrc): loss, hooks, projection, pairing,
stacking and statistics."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdaudit.conditions.features import FeatureSetup, FeatureTaps, Projection, channel_dim
from kdaudit.conditions.objectives import Batch, build_objective, objective_parameters
from kdaudit.config import ConfigError, load_config
from kdaudit.data import load_data
from kdaudit.engine.loop import train
from kdaudit.engine.run import build_run, execute
from kdaudit.engine.teachers import Teachers
from kdaudit.executors import run_local
from kdaudit.executors.local_stack import stack_groups
from kdaudit.protocol import expand
from kdaudit.stats import analyse
from kdaudit.store import RunStore
from tests.conftest import write_config
from tests.test_stats import ALL_FUNCTIONAL, BASE, frame, rows, values

FEATURES = {"conditions": ["siddo", "fmkd", "fmrc"], "feature_modules": ["2"]}


def _mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 4))


def _setup(teacher, probe, modules=(("2", "2"),)) -> FeatureSetup:
    return FeatureSetup(teacher, modules, probe, init_seed=0, data_seed=10)


def test_fmkd_loss_matches_a_hand_computed_value():
    """(1 - a) CE + a MSE(f_s, f_t) at one ReLU layer of equal width (no projection)."""
    student, teacher = _mlp(2, 0), _mlp(2, 1)
    with torch.no_grad():
        student[1].weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]))
        student[1].bias.zero_()
        teacher[1].weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
        teacher[1].bias.zero_()
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    objective = build_objective("fmkd", 0.25, None, 4, _setup(teacher, x), student)
    student.train()
    logits = student(x)
    batch = Batch(torch.arange(2), x, torch.tensor([1, 3]))
    loss = objective(logits, batch)
    # features: student ReLU([1, 1.5], [-3, 2]) = [[1, 1.5], [0, 2]]; teacher [[2, 3], [1, 4]]
    mse = ((1 - 2) ** 2 + (1.5 - 3) ** 2 + (0 - 1) ** 2 + (2 - 4) ** 2) / 4  # = 2.0625
    ce = torch.nn.functional.cross_entropy(logits, batch.y).item()
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * mse, rel=1e-6)
    assert objective_parameters(objective) == []  # equal widths: no projection


def test_taps_keep_the_named_module_output_in_training_only():
    model = _mlp(5, 0)
    taps = FeatureTaps(model, ("2",), "student")
    x = torch.randn(6, 3)
    model.train()
    model(x)
    (kept,) = taps.take()
    torch.testing.assert_close(kept, torch.relu(model[1](x)))
    assert kept.requires_grad  # the loss backpropagates into the student through it
    model.eval()
    model(x)
    assert taps.outputs == {}  # evaluation passes are not kept


def test_an_unknown_module_is_an_error_listing_the_modules():
    with pytest.raises(ValueError, match=r"no module 'blocks.9'; its modules: 0, 1, 2, 3"):
        FeatureTaps(_mlp(5, 0), ("blocks.9",), "student")


def test_a_config_with_feature_conditions_needs_feature_modules(tmp_path):
    path = write_config(tmp_path, protocol={"conditions": ["siddo", "fmkd"]})
    with pytest.raises(ConfigError, match="protocol.feature_modules"):
        load_config(path)


def test_channel_dim_is_the_one_dimension_that_differs():
    assert channel_dim(torch.Size([8, 16, 32]), torch.Size([8, 16, 64])) == 2  # (B, T, C)
    assert channel_dim(torch.Size([8, 32, 4, 4]), torch.Size([8, 64, 4, 4])) == 1  # (B, C, H, W)
    assert channel_dim(torch.Size([8, 32]), torch.Size([8, 32])) is None
    with pytest.raises(ValueError, match="more than the channel"):
        channel_dim(torch.Size([8, 32, 4]), torch.Size([8, 64, 5]))


def test_a_narrower_student_gets_a_projection_that_its_optimizer_trains(tiny_config):
    """Widths 8 (student) and 16 (teacher): a seeded 8 -> 16 projection, updated by train()."""
    cfg = load_config(tiny_config, ["model.depth=2"])
    data = load_data(cfg.data)
    teacher = _build(cfg, 16, 0, data)
    student = _build(cfg, 8, 1, data)
    probe = data.train_batch(torch.arange(32), "none")[0]
    objective = build_objective("fmkd", 0.5, None, 10, _setup(teacher, probe), student)
    (proj,) = objective.proj
    assert isinstance(proj, Projection) and proj.linear.weight.shape == (16, 8)
    again = build_objective("fmkd", 0.5, None, 10, _setup(teacher, probe), _build(cfg, 8, 1, data))
    torch.testing.assert_close(again.proj[0].linear.weight, proj.linear.weight)  # seeded
    before = proj.linear.weight.detach().clone()
    train(student, data, objective, cfg.train, data_seed=10)
    assert not torch.equal(before, proj.linear.weight)


def _build(cfg, width, seed, data):
    from dataclasses import replace

    from kdaudit.models import build_model

    return build_model(replace(cfg.model, width=width), data.input_shape, data.num_classes, seed)


def test_fmrc_targets_are_fixed_random_tensors_at_the_teacher_scale(tiny_config):
    cfg = load_config(tiny_config)
    data = load_data(cfg.data)
    teacher, student = _build(cfg, 16, 0, data), _build(cfg, 16, 0, data)
    probe = data.train_batch(torch.arange(256), "none")[0]
    objective = build_objective("fmrc", 0.5, None, 10, _setup(teacher, probe), student)
    first = objective.targets(Batch(torch.arange(4), probe[:4], None))
    other = objective.targets(Batch(torch.arange(4, 8), probe[4:8], None))
    assert first[0].shape == (1, 16) and first[0] is other[0]  # one tensor, every example
    scale = teacher[2](teacher[1](probe)).std().item()
    assert first[0].std().item() == pytest.approx(scale, rel=0.5)  # 16 draws of N(0, scale)


def test_fmkd_and_fmrc_are_paired_with_siddo(tmp_path):
    """Same init and minibatches as SIDDO; alpha = 0 trains exactly the SIDDO model; the
    teacher keeps its weights for the per-batch teacher pass."""
    path = write_config(tmp_path, protocol={**FEATURES, "alphas": [0.0, 0.5]})
    cfg = load_config(path)
    grid, out = expand(cfg), tmp_path / "out"
    run_local(cfg, out, "cpu")
    store = RunStore(out)
    assert (store.runs / grid.teachers[0].run_id / "weights.safetensors").is_file()
    data, teachers = load_data(cfg.data), Teachers(store, torch.device("cpu"))
    for seed in (10, 11):
        runs = {(s.condition, s.alpha): s for s in grid.students if s.student_seed == seed}
        siddo = runs[("siddo", None)]
        init = build_run(siddo, data, teachers)[0].state_dict()
        logits = lambda s: np.asarray(store.array(s.run_id, "test_logits"))  # noqa: E731
        for name in ("fmkd", "fmrc"):
            state = build_run(runs[(name, 0.5)], data, teachers)[0].state_dict()
            assert all(torch.equal(state[k], init[k]) for k in init)
            np.testing.assert_array_equal(logits(runs[(name, 0.0)]), logits(siddo))
            assert not np.array_equal(logits(runs[(name, 0.5)]), logits(siddo))
    _same_batches(grid, data, tmp_path / "again")


def _same_batches(grid, data, out):
    store = RunStore(out)
    teachers = Teachers(store, torch.device("cpu"))
    seen = {}
    for spec in grid.runs:
        batches = seen.setdefault(spec.run_id, [])
        record = lambda s, idx, loss, b=batches: b.append(idx.clone())  # noqa: E731
        execute(spec, data, store, teachers, save_weights=spec.is_teacher, on_step=record)
    for seed in (10, 11):
        orders = [torch.cat(seen[s.run_id]) for s in grid.students if s.student_seed == seed]
        assert len(orders) == 5 and all(torch.equal(o, orders[0]) for o in orders)


def test_a_smaller_student_audit_runs_with_projections(tmp_path):
    path = write_config(tmp_path, protocol={**FEATURES, "student_seeds": [10],
                                            "student_model": {"name": "mlp", "width": 8,
                                                              "depth": 1}})  # fmt: skip
    outcome = run_local(load_config(path), tmp_path / "out", "cpu")
    assert outcome.completed == outcome.total == 4 and not outcome.failed


def test_stacking_trains_feature_runs_one_at_a_time(tmp_path):
    grid = expand(load_config(write_config(tmp_path, protocol=FEATURES)))
    groups = stack_groups(list(grid.students), 8)
    for group in groups:
        assert len(group) == 1 or all(s.condition == "siddo" for s in group)
    assert sum(len(g) == 1 for g in groups) == 4  # 2 seeds x (fmkd, fmrc)


def test_fmkd_gets_verdicts_against_siddo_and_fmrc():
    flat = dict(BASE)
    runs = frame(
        rows("siddo", math.nan, math.nan, flat),
        rows("fmrc", 0.5, math.nan, flat),
        rows("fmkd", 0.5, math.nan, values(ALL_FUNCTIONAL)),
        rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)),  # no RCD: KD cannot be supported
    )
    settings = {s.condition: s for s in analyse(runs).settings}
    fmkd = settings["fmkd"]
    assert fmkd.verdict == "supported" and fmkd.n_significant == 4
    assert [c.control for c in fmkd.comparisons] == ["siddo", "fmrc"]
    assert fmkd.verdict_controls == ("siddo", "fmrc") and math.isnan(fmkd.temperature)
    assert fmkd.paper_asymmetry.label != "undetermined"
    assert settings["kd"].verdict == "not_supported"
    assert [c.control for c in settings["kd"].comparisons] == ["siddo"]  # FMRC is not KD's
    frame_ = analyse(runs).verdicts_frame()
    assert list(frame_["condition"]) == ["kd", "fmkd"]
