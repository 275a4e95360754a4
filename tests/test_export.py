"""`kdaudit export`: a run directory's test logits as a compare manifest, from which
`kdaudit compare` re-analyses the audit to the same metrics and verdicts."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from kdaudit import api
from kdaudit.cli import main
from kdaudit.compare import CompareError
from kdaudit.compare.export import export_manifest
from kdaudit.executors import ExecutorConfig

SETTING = ["teacher_seed", "student_seed", "condition", "alpha", "temperature", "metric"]


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """A complete tiny audit with six student seeds (enough for verdicts) and its result."""
    import yaml

    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("export")
    config = folder / "tiny.yaml"
    seeds = {**TINY["protocol"], "student_seeds": list(range(10, 16))}
    config.write_text(yaml.safe_dump({**TINY, "protocol": seeds}))
    return api.run(
        config, folder / "out", device="cpu", executor=ExecutorConfig("local", workers=1)
    )


def _values(runs: pd.DataFrame) -> pd.Series:
    return runs.set_index(SETTING)["value"].sort_index()


def test_the_manifest_lists_every_run_and_the_labels(audit):
    path, n = export_manifest(audit.out)
    assert path == audit.out / "manifest.csv" and n == 19
    rows = list(csv.DictReader(path.open()))
    assert rows[0] == {"role": "labels", "alpha": "", "temperature": "", "seed": "",
                       "teacher_seed": "", "path": "test_labels.npy"}  # fmt: skip
    assert sorted(r["role"] for r in rows[1:]) == [*["kd"] * 6, *["rcd"] * 6, *["siddo"] * 6,
                                                   "teacher"]  # fmt: skip
    teacher = next(r for r in rows if r["role"] == "teacher")
    assert teacher["seed"] == "0" and teacher["path"].endswith("/test_logits.npy")


def test_compare_of_the_export_equals_the_audit(audit, tmp_path):
    manifest, _ = export_manifest(audit.out, tmp_path / "elsewhere" / "m.csv")
    again = api.compare(manifest, tmp_path / "compared")
    ours, theirs = _values(audit.runs), _values(again.runs)
    shared = ours.index.intersection(theirs.index)
    assert len(shared) == len(theirs) > 0  # every metric compare computes, the audit has
    np.testing.assert_allclose(theirs[shared], ours[shared], rtol=1e-6, atol=1e-9)
    assert again.verdict_lines() == audit.verdict_lines()
    assert "too few paired seeds" not in again.verdict_lines()[0]  # a real verdict


def test_the_cli_exports(audit, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["export", str(audit.out), "--out", str(out)]) == 0
    assert f"kdaudit compare {out}" in capsys.readouterr().out
    assert main(["compare", str(out), "--out", str(tmp_path / "c")]) == 0


def test_an_empty_run_directory_is_an_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no experiment.yaml" in capsys.readouterr().err


def test_a_capacity_grid_has_no_manifest_form(tmp_path):
    from kdaudit.config import load_config
    from kdaudit.store import RunStore
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path, protocol={"student_widths": [0.5, 1.0]}))
    RunStore(tmp_path / "out").save_experiment(cfg)
    with pytest.raises(CompareError, match="no width column"):
        export_manifest(tmp_path / "out")
