import pytest

from kdaudit.config import ConfigError, load_config, to_dict
from kdaudit.store import RunStore
from tests.conftest import write_config


def test_loads_defaults_and_typed_sections(tiny_config):
    cfg = load_config(tiny_config)
    assert cfg.model.name == "mlp" and cfg.model.width == 16
    assert cfg.protocol.alphas == (0.5,)
    assert cfg.train.optimizer == "adam"  # default filled in
    assert cfg.self_distillation


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'; allowed keys: augment, batch_size"),
        ("model.widht=3", "unknown key 'model.widht'; allowed keys: depth, name, width"),
        ("train.epochs=two", "train.epochs: expected int, got 'two'"),
        ("train.epochs=true", "train.epochs: expected int"),
        ("model.name=resnet", "unknown model 'resnet'; registered: .*cnn1d, .*mlp"),
        ("protocol.conditions=[kd, bogus]", "'bogus' is not allowed; choose one of"),
        ("protocol.alphas=[1.5]", "outside [0, 1]"),
        ("protocol.student_seeds=[0, 10]", "both teacher and student seeds"),
        ("train.optimizer=lbfgs", "choose one of adam, adamw, sgd"),
        ("analysis.baseline=best", "choose accuracy or agreement"),
        ("analysis.fdr_method=holm", "analysis.fdr_method: 'holm' is not allowed; choose bh or by"),
        ("train.max_steps=-5", "train.max_steps: must be > 0, got -5; leave it out"),
        ("train.max_steps=0", "train.max_steps: must be > 0, got 0"),
        ("train.eval_batch_size=0", "train.eval_batch_size: must be > 0"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
        ("protocol.student_seeds=[]", "protocol.student_seeds: empty; give at least one seed"),
        (
            "protocol.student_seeds=[10, 11, 10]",
            "protocol.student_seeds: seeds [10] are listed twice",
        ),
        ("protocol.teacher_seeds=[]", "protocol.teacher_seeds: empty"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(tiny_config, [override])


def test_overrides_are_parsed_as_yaml(tiny_config):
    cfg = load_config(tiny_config, ["protocol.alphas=[0.1, 0.9]", "train.lr=1e-3",
                                    "protocol.temperatures=2", "model.name=cnn1d",
                                    "model.width=4", "model.depth=1"])  # fmt: skip
    assert cfg.protocol.alphas == (0.1, 0.9)
    assert cfg.train.lr == 1e-3  # PyYAML reads 1e-3 as a string; accepted for a float key
    assert cfg.protocol.temperatures == (2.0,)  # a scalar where a list is expected
    assert cfg.model.name == "cnn1d" and cfg.model.kernel_size == 5


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'; allowed keys: analysis, data"):
        load_config(write_config(tmp_path, trian={"lr": 1}))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_the_store(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=3"])
    store = RunStore(tmp_path / "out")
    store.save_experiment(cfg)
    assert store.load_experiment() == cfg
    assert to_dict(store.load_experiment())["train"]["epochs"] == 3


def test_data_dir_comes_from_the_flag_else_the_config(tiny_config, tmp_path, monkeypatch):
    from kdaudit import api

    seen = []
    monkeypatch.setattr(
        "kdaudit.executors.run_grid", lambda cfg, out, ex, dev, data_dir, *a: seen.append(data_dir)
    )
    monkeypatch.setattr(api, "expand", lambda cfg: type("G", (), {"students": ()})())
    from_config = tmp_path / "from-config"
    api.run(tiny_config, tmp_path / "a", overrides=[f"data_dir={from_config}"])
    api.run(tiny_config, tmp_path / "b", overrides=[f"data_dir={from_config}"], data_dir="flag")
    api.run(tiny_config, tmp_path / "c")
    assert seen == [str(from_config), "flag", None]


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML: line \d+, column \d+"):
        load_config(path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xff")
    with pytest.raises(ConfigError, match="weights.yaml: not a text file"):
        load_config(binary)
