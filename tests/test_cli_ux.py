"""The first hour of a new user at the command line: discoverability (--version, list,
help), and ordinary mistakes answered with one line before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdaudit import __version__
from kdaudit.catalog import KINDS, catalog
from kdaudit.cli import main
from kdaudit.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = "train.epochs=1"  # the tiny audit, faster still


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120, **kwargs)  # fmt: skip


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdaudit {__version__}"


def test_help_speaks_to_users_and_imports_nothing_heavy():
    code = ("import sys\nfrom kdaudit.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'pandas', 'scipy', 'matplotlib', 'rich') "
            "if m in sys.modules])")  # fmt: skip
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "examples:" in done.stdout and "kdaudit run configs/mnist1d.yaml" in done.stdout
    assert "`kdaudit` command line" not in done.stdout  # not the module's docstring
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_config_error_answers_before_torch_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndata: {name: mnist1d}\nmodel: {name: mlp, wdth: 3}\n")
    code = ("import sys\nfrom kdaudit.cli import main\n"
            "code = main(['run', sys.argv[1], '--out', sys.argv[2]])\n"
            "print(code, 'torch' in sys.modules)")  # fmt: skip
    done = _python(code, str(bad), str(tmp_path / "out"))
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip() == (
        "kdaudit: error: unknown key 'model.wdth'; allowed keys: depth, name, width"
    )
    assert not (tmp_path / "out").exists()


def test_list_imports_nothing_heavy():
    code = ("import sys\nfrom kdaudit.cli import main\nmain(['list'])\n"
            "print('torch' in sys.modules)")  # fmt: skip
    done = _python(code)
    assert done.returncode == 0 and done.stdout.split()[-1] == "False", done.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_list_names_every_entry_with_a_description(kind, capsys):
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    items = catalog(kind)
    assert items and all(item.about for item in items)
    for item in items:
        assert f"  {item.name}" in out


def test_list_shows_settings_and_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [
        f"{k}:" for k in KINDS
    ]
    assert "settings: width=256, depth=2" in out  # mlp
    assert "configs/mnist1d.yaml" in out and "The default audit" in out
    assert "SIDDO (Same initialisation, different data order): an independent student" in out


# ---------------------------------------------------------------- --out that cannot be one


def _run(config: Path, out: Path, *extra: str) -> int:
    return main(["run", str(config), "--out", str(out), "--device", "cpu", "--workers", "1",
                 "--set", EPOCHS, *extra])  # fmt: skip


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdaudit: error: "), err
    return err[0]


def test_out_that_is_a_file(tiny_config, tmp_path, capsys):
    out = tmp_path / "taken.txt"
    out.write_text("mine")
    assert _run(tiny_config, out) == 2
    line = _error(capsys)
    assert f"run directory {out} is a file" in line and "give --out a directory" in line
    assert out.read_text() == "mine"


def test_out_under_a_file(tiny_config, tmp_path, capsys):
    (tmp_path / "taken.txt").write_text("mine")
    out = tmp_path / "taken.txt" / "audit"
    assert _run(tiny_config, out) == 2
    assert f"lies under the file {tmp_path / 'taken.txt'}" in _error(capsys)


def test_out_read_only(tiny_config, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o555 directory is still writable")
        assert _run(tiny_config, locked / "audit") == 2
        line = _error(capsys)
        assert f"{locked} is read-only" in line and "chmod u+w" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- another config, same --out


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, Path]:
    """A complete tiny audit: (its config, its run directory)."""
    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("audited")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = folder / "out"
    assert _run(config, out) == 0
    return config, out


def test_same_config_resumes(audited, capsys):
    config, out = audited
    assert _run(config, out) == 0
    assert "0 runs completed now, 7 were already complete" in capsys.readouterr().out


def test_another_config_is_refused_before_training(audited, capsys):
    config, out = audited
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert _run(config, out, "--set", "model.width=8", "--set", "train.lr=0.02") == 2
    line = _error(capsys)
    assert f"{out / 'experiment.yaml'}" in line and str(config) in line
    assert "model.width: 16 -> 8" in line and "train.lr: 0.01 -> 0.02" in line
    assert "--force-new-config" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_smoke_counts_as_another_config(audited, capsys):
    config, out = audited
    assert _run(config, out, "--smoke") == 2
    assert "train.max_steps" in _error(capsys)


def test_force_new_config_keeps_the_old_runs(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny_config, out) == 0
    old = {p.name for p in (out / "runs").iterdir()}
    assert _run(tiny_config, out, "--set", "model.width=8", "--force-new-config") == 0
    assert old < {p.name for p in (out / "runs").iterdir()}
    assert load_config(tiny_config, ["model.width=8"]).model == _saved(out).model


def _saved(out: Path):
    from kdaudit.store import RunStore

    return RunStore(out).load_experiment()


# ---------------------------------------------------------------- pipes


def test_status_into_a_closed_pipe_prints_no_traceback(audited):
    _, out = audited
    code = "import sys\nfrom kdaudit.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", code, "status", str(out), "--json"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    p.stdout.close()  # the reader is gone before the first write (`| head -0`)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_status_json_still_prints(audited, capsys):
    _, out = audited
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] == 7


# ---------------------------------------------------------------- paths in a config


def test_paths_in_a_config_are_relative_to_its_file(tmp_path, monkeypatch):
    from tests.conftest import TINY

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    raw = {**TINY, "data_dir": "../data",
           "protocol": {**TINY["protocol"], "teacher_checkpoint": "weights/t.pt"}}  # fmt: skip
    (folder / "a.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # elsewhere: the cwd must not matter
    cfg = load_config("project/configs/a.yaml")
    assert cfg.data_dir == str(tmp_path / "project" / "data")
    assert cfg.protocol.teacher_checkpoint == str(folder / "weights" / "t.pt")
    # a --set value is typed at the command line: relative to the working directory
    assert load_config("project/configs/a.yaml", ["data_dir=mine"]).data_dir == "mine"


def test_a_relative_checkpoint_is_found_from_another_directory(tmp_path, monkeypatch, capsys):
    """The error names the file next to the config, not one in the working directory."""
    from tests.conftest import TINY

    raw = {**TINY, "protocol": {**TINY["protocol"], "teacher_checkpoint": "t.pt"}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "a.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert _run(Path("cfg/a.yaml"), tmp_path / "out") == 2
    assert f"no file at {tmp_path / 'cfg' / 't.pt'}" in _error(capsys)
