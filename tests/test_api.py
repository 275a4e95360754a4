"""Auditing the user's own code: kdaudit.audit() on Python objects, configs naming
`package.module:function`, pretrained teachers, and the errors for each."""

import json
import textwrap
import uuid

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import kdaudit
from kdaudit import api
from kdaudit.cli import main
from kdaudit.config import ConfigError, load_config
from kdaudit.data import load_data
from kdaudit.models import build_model
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import TINY, write_config

GRID = dict(student_seeds=(10, 11), alphas=(0.5,), epochs=2, batch_size=32, lr=0.01,
            device="cpu")  # fmt: skip


def tiny_net(seed: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def splits():
    """Three linearly separable classes in 8 dimensions: (x, y) train and test pairs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(260, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=gen)).argmax(dim=1)
    return (x[:200], y[:200]), (x[200:], y[200:])


def _record_times(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/record.json")}


def test_audit_runs_the_protocol_on_objects_and_an_identical_call_resumes(splits, tmp_path):
    train, test = splits
    result = kdaudit.audit(tiny_net, train, test, out=tmp_path / "out", teacher_seeds=(0,),
                           **GRID)  # fmt: skip
    # 1 teacher + 2 seeds x (siddo, kd, rcd), through the engine and its run store
    assert result.outcome.completed == 7 and not result.outcome.failed
    assert len(_record_times(tmp_path / "out")) == 7
    assert set(result.runs.condition) == {"siddo", "kd", "rcd"}
    assert len(result.verdicts) == 1 and result.report.is_file()
    saved = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())
    assert saved["data"]["name"] == "in_memory" and len(saved["data"]["sha256"]) == 64
    assert saved["model"]["factory"].endswith("test_api:tiny_net")
    before = _record_times(tmp_path / "out")

    # The same data as a map-style Dataset materialises to the same tensors: same run ids.
    dataset = torch.utils.data.TensorDataset(*train)
    again = kdaudit.audit(tiny_net, dataset, test, out=tmp_path / "out", teacher_seeds=(0,),
                          **GRID)  # fmt: skip
    assert again.outcome.completed == 0 and again.outcome.skipped == 7
    assert _record_times(tmp_path / "out") == before  # nothing retrained or rewritten


def test_a_pretrained_teacher_is_loaded_and_students_share_their_own_init(splits, tmp_path):
    train, test = splits
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))  # not the students'
    result = kdaudit.audit(tiny_net, train, test, teacher=teacher, out=tmp_path / "out", **GRID)
    assert result.outcome.completed == 7
    store = RunStore(tmp_path / "out")
    cfg = store.load_experiment()
    grid = expand(cfg)
    (t,) = grid.teachers
    record = store.record(t.run_id)
    assert record["steps"] == 0 and record["pretrained"]["sha256"] == cfg.protocol.teacher_sha256
    assert (tmp_path / "out" / "teacher.safetensors").is_file()
    with torch.no_grad():  # the stored teacher outputs are the passed module's
        expected = teacher(test[0]).numpy()
    assert torch.allclose(torch.from_numpy(store.array(t.run_id, "test_logits").copy()),
                          torch.from_numpy(expected), atol=1e-6)  # fmt: skip

    inits = {}
    for s in grid.students:
        assert s.init_seed == s.student_seed  # their own init, not the teacher's (seed 0)
        model = build_model(s.model, (8,), 3, s.init_seed)
        weights = torch.cat([p.flatten() for p in model.parameters()])
        inits.setdefault(s.student_seed, []).append(weights)
    for same_seed in inits.values():
        assert len(same_seed) == 3 and all(torch.equal(same_seed[0], w) for w in same_seed)
    assert not torch.equal(inits[10][0], inits[11][0])

    html = result.report.read_text()
    assert "teacher: pretrained" in html and "students share their own initialisation" in html
    summary = json.loads((result.report.parent / "summary.json").read_text())
    assert "not the teacher" in json.dumps(summary)


def test_a_teacher_whose_output_size_differs_from_the_classes_is_refused(splits, tmp_path):
    train, test = splits
    teacher = nn.Linear(8, 5)
    with pytest.raises(ConfigError, match=r"outputs 5 classes .* dataset has 3"):
        kdaudit.audit(tiny_net, train, test, teacher=teacher, out=tmp_path / "out", **GRID)
    assert not (tmp_path / "out" / "runs").exists()


def test_audit_refuses_executors_that_cannot_see_its_objects(splits, tmp_path):
    with pytest.raises(ConfigError, match="only in this process"):
        kdaudit.audit(tiny_net, *splits, out=tmp_path / "out", executor="ray", **GRID)


def test_a_factory_returning_no_module_or_wrong_classes_is_a_clear_error(splits, tmp_path):
    with pytest.raises(ConfigError, match="returned a str, not a torch.nn.Module"):
        kdaudit.audit(lambda seed: "net", *splits, out=tmp_path / "a", **GRID)
    with pytest.raises(ConfigError, match="outputs 4 logits per example but the dataset has 3"):
        kdaudit.audit(lambda seed: nn.Linear(8, 4), *splits, out=tmp_path / "b", **GRID)


def test_a_teacher_factory_with_wrong_classes_is_called_the_teacher(splits, tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher factory .* outputs 5 logits .* has 3"):
        kdaudit.audit(tiny_net, *splits, teacher=lambda seed: nn.Linear(8, 5),
                      out=tmp_path / "a", **GRID)  # fmt: skip
    with pytest.raises(ConfigError, match=r"^student model factory .* outputs 4 logits"):
        kdaudit.audit(lambda seed: nn.Linear(8, 4), *splits, teacher=lambda seed: tiny_net(seed),
                      out=tmp_path / "b", **GRID)  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("labels, kind", [(["a", "b", "c"], "string"), ([object()] * 3, "object")])
def test_string_or_object_labels_name_the_fix(splits, tmp_path, labels, kind):
    (x, _), test = splits
    y = np.array((labels * 70)[:200], dtype=object if kind == "object" else None)
    with pytest.raises(ConfigError, match=rf"train y holds {kind} values .* np.unique\(y, "):
        kdaudit.audit(tiny_net, (x, y), test, out=tmp_path / "out", **GRID)


def test_a_refused_call_with_a_pretrained_teacher_leaves_no_checkpoint(splits, tmp_path):
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match="both teacher and student seeds"):
        kdaudit.audit(tiny_net, *splits, teacher=teacher, out=tmp_path / "out",
                      **{**GRID, "student_seeds": (0, 1)})  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_factory_whose_initialisation_changed_gets_new_run_ids(splits, tmp_path):
    def net(scale):
        def factory(seed):
            model = tiny_net(seed)
            with torch.no_grad():
                model[0].weight.mul_(scale)
            return model

        factory.__qualname__ = "net"  # one name and one architecture, other weights
        return factory

    grid = dict(GRID, epochs=1, student_seeds=(10,))
    kdaudit.audit(net(1.0), *splits, out=tmp_path / "out", teacher_seeds=(0,), **grid)
    before = _record_times(tmp_path / "out")
    again = kdaudit.audit(net(1.0), *splits, out=tmp_path / "out", teacher_seeds=(0,), **grid)
    assert again.outcome.completed == 0  # the same factory resumes
    with pytest.raises(ConfigError, match=r"holds the audit of another config .* differs in "
                                          r"model\.fingerprint.* Give another out, or "
                                          r"force_new_config=True"):  # fmt: skip
        kdaudit.audit(net(0.5), *splits, out=tmp_path / "out", teacher_seeds=(0,), **grid)
    assert _record_times(tmp_path / "out") == before
    other = kdaudit.audit(net(0.5), *splits, out=tmp_path / "out", teacher_seeds=(0,),
                          force_new_config=True, **grid)  # fmt: skip
    assert other.outcome.completed == len(before) and other.outcome.skipped == 0
    assert set(before) <= set(_record_times(tmp_path / "out"))  # old runs kept


def test_a_refused_call_leaves_the_earlier_pretrained_teacher_file_alone(splits, tmp_path):
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    grid = dict(GRID, epochs=1, student_seeds=(10,))
    kdaudit.audit(tiny_net, *splits, teacher=teacher, out=tmp_path / "out", **grid)
    saved = (tmp_path / "out" / "teacher.safetensors").read_bytes()
    with torch.no_grad():
        teacher[0].weight.mul_(2.0)  # another teacher: another config
    with pytest.raises(ConfigError, match="holds the audit of another config"):
        kdaudit.audit(tiny_net, *splits, teacher=teacher, out=tmp_path / "out", **grid)
    assert (tmp_path / "out" / "teacher.safetensors").read_bytes() == saved


# ---------------------------------------------------------------- configs naming user code

USER_MODULE = """
    import torch
    from torch import nn

    SEEDS = []  # (seed, width) of every call, for the test to read
    WIDTH = 3

    def make(seed, width=16):
        SEEDS.append((seed, width))
        return nn.Sequential(nn.Flatten(), nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))

    def load(data_dir, n_train=200):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(260, 1, 8, generator=gen)
        y = (x.flatten(1) @ torch.randn(8, 3, generator=gen)).argmax(dim=1)
        train = torch.utils.data.TensorDataset(x[:n_train], y[:n_train])
        return train, (x[200:], y[200:])

    def not_a_model(seed):
        return "net"
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of user code on sys.path, named per test (imports are cached per name)."""
    name = f"kd_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _user_config(tmp_path, module, protocol=None, **sections):
    """TINY with user code for data and model (sections replaced, not merged)."""
    raw = {**TINY, "data": {"factory": f"{module}:load", "kwargs": {"n_train": 180}},
           "model": {"factory": f"{module}:make"}, **sections}  # fmt: skip
    raw["protocol"] = {**TINY["protocol"], **(protocol or {})}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_cli_audits_factories_named_in_a_config(tmp_path, user_module):
    import importlib

    student = {"factory": f"{user_module}:make", "kwargs": {"width": 4}}
    path = _user_config(tmp_path, user_module, protocol={"student_model": student})
    # one at a time in this process (--workers 1), where SEEDS records the factory's calls
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--workers", "1"]) == 0  # fmt: skip
    seeds = importlib.import_module(user_module).SEEDS
    assert (0, 16) in seeds  # the teacher: fn(seed, **kwargs) with its init seed
    assert {(10, 4), (11, 4)} <= set(seeds)  # smaller students: init seed = student seed
    cfg = RunStore(tmp_path / "out").load_experiment()  # experiment.yaml round-trips
    assert cfg.data.kwargs == {"n_train": 180} and cfg.protocol.student_model.kwargs == {"width": 4}
    store = RunStore(tmp_path / "out")
    assert all(store.is_complete(r.run_id) for r in expand(cfg).runs)
    assert store.array(expand(cfg).teachers[0].run_id, "train_logits").shape == (180, 3)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            "mymodels.make",
            r"model: factory 'mymodels.make' is not of the form 'package.module:function'",
        ),
        ("kd_no_such_module_x:make", r"model.factory: cannot import module 'kd_no_such_module_x'"),
        ("{module}:missing", r"model.factory: .* has no attribute 'missing'"),
        ("{module}:WIDTH", r"model.factory: .*:WIDTH' is not callable \(an int\)"),
        ("{module}:not_a_model", r"returned a str, not a torch.nn.Module"),
    ],
)
def test_bad_factories_in_a_config_are_one_line_errors(tmp_path, user_module, factory, message):
    path = _user_config(tmp_path, user_module)
    override = f"model.factory={factory.format(module=user_module)}"
    with pytest.raises(ConfigError, match=message) as err:
        api.run(load_config(path, [override]), tmp_path / "out", device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "runs").exists()  # refused before any run


def test_a_data_factory_returning_the_wrong_thing_is_named(tmp_path, user_module):
    path = _user_config(tmp_path, user_module, data={"factory": f"{user_module}:not_a_model"})
    with pytest.raises(
        ConfigError,
        match=r"data.factory .*:not_a_model returned a str; it must return \(train, test\)",
    ):
        api.run(path, tmp_path / "out", device="cpu")


def test_a_checkpoint_that_does_not_fit_the_model_names_keys_and_shapes(tmp_path):
    wrong = build_model(load_config(write_config(tmp_path, model={"name": "mlp", "width": 8,
                                                                  "depth": 1})).model,
                        (1, 40), 10, 0)  # fmt: skip
    ckpt = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, ckpt)
    path = write_config(tmp_path, protocol={"teacher_seeds": [0], "teacher_checkpoint": str(ckpt)})
    with pytest.raises(ConfigError, match=r"does not fit the model: .*shape mismatches: "
                                          r"1.weight \(8, 40\) in the file, \(16, 40\) in the model"):  # fmt: skip
        api.run(path, tmp_path / "out", device="cpu")


def test_a_checkpoint_needs_exactly_one_teacher_seed(tmp_path):
    path = write_config(tmp_path, protocol={"teacher_seeds": [0, 1], "teacher_checkpoint": "t.pt"})
    with pytest.raises(ConfigError, match="protocol.teacher_seeds: a pretrained teacher"):
        load_config(path)


def test_a_checkpoint_in_a_config_is_loaded_and_students_get_their_own_init(tmp_path):
    cfg = load_config(write_config(tmp_path))
    trained = build_model(cfg.model, (1, 40), 10, 99)  # stands in for a trained teacher
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    path = write_config(tmp_path, protocol={"teacher_checkpoint": str(tmp_path / "teacher.pt"),
                                            "teacher_seeds": [0]})  # fmt: skip
    result = api.run(path, tmp_path / "out", device="cpu")
    outcome = result.outcome
    assert outcome.completed == 7 and not outcome.failed
    store = RunStore(tmp_path / "out")
    pinned = store.load_experiment()  # the sha256 is recorded: the report needs no file
    assert len(pinned.protocol.teacher_sha256) == 64
    grid = expand(pinned)
    teacher = grid.teachers[0]
    assert store.record(teacher.run_id)["steps"] == 0
    assert result is not None and result.report.is_file()
    x = load_data(pinned.data).test_x
    with torch.no_grad():
        expected = trained.eval()(x)
    assert torch.allclose(torch.from_numpy(store.array(teacher.run_id, "test_logits").copy()),
                          expected, atol=1e-5)  # fmt: skip
    # Same architecture, yet not self-distillation from the teacher's init (unknown): every
    # student starts from its own seed's init; without the checkpoint they share seed 0's.
    assert all(s.init_seed == s.student_seed for s in grid.students)
    assert all(s.init_seed == 0 for s in expand(cfg).students)
