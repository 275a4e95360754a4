"""The teacher-error sweep (protocol.teacher_label_noise): the noisy labels, the grid it
expands to (run ids of grids without it unchanged), the validation, and a tiny sweep through
the engine, the tables and the report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kdaudit.config import load_config
from kdaudit.engine.teachers import noise_seed, noisy_labels, teacher_labels, with_teacher_labels
from kdaudit.errors import ConfigError
from kdaudit.protocol import expand, smoke
from kdaudit.stats import analyse, summarise
from kdaudit.store import RunStore
from kdaudit.store.tables import load_runs, load_teachers
from tests.conftest import write_config

ROOT = Path(__file__).parents[1]
RATES = [0.0, 0.2]
LABELS = torch.arange(1000) % 10  # (N,): 10 classes


# ----------------------------------------------------------------------------- noisy labels


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.2, 0.4, 0.333])
def test_noisy_labels_change_exactly_round_rate_n(rate):
    noisy = noisy_labels(LABELS, 10, rate, seed=7)
    assert (noisy != LABELS).sum().item() == round(rate * len(LABELS))
    assert noisy.dtype == LABELS.dtype and noisy.min() >= 0 and noisy.max() < 10


def test_noisy_labels_are_deterministic_per_seed_and_differ_between_rates_and_seeds():
    a = noisy_labels(LABELS, 10, 0.1, noise_seed(0, 0.1))
    assert torch.equal(a, noisy_labels(LABELS, 10, 0.1, noise_seed(0, 0.1)))
    other_seed = noisy_labels(LABELS, 10, 0.1, noise_seed(1, 0.1))
    assert not torch.equal(a, other_seed)
    b = noisy_labels(LABELS, 10, 0.2, noise_seed(0, 0.2))
    assert not torch.equal(a != LABELS, (b != LABELS)[: len(a)])
    seeds = {noise_seed(t, r) for t in (0, 1, 2) for r in (0.05, 0.1, 0.2, 0.4)}
    assert len(seeds) == 12


def test_new_labels_are_spread_over_the_other_classes():
    noisy = noisy_labels(LABELS, 10, 0.4, seed=3)
    changed = noisy != LABELS
    shift = ((noisy - LABELS) % 10)[changed]  # 1..9: every other class, about equally often
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 0.6 * changed.sum() / 9).all()


def _specs(tmp_path, rates=RATES):
    cfg = load_config(write_config(tmp_path, protocol={"teacher_label_noise": rates}))
    return expand(cfg)


class _Data:
    """The few fields teacher_labels reads."""

    cacheable = True
    num_classes = 10

    def labels(self, split):
        return LABELS


def test_only_a_noisy_teacher_trains_on_other_labels(tmp_path):
    grid = _specs(tmp_path)
    clean, noisy = grid.teachers
    assert clean.label_noise is None and noisy.label_noise == 0.2
    labels = teacher_labels(noisy, _Data())
    assert (labels != LABELS).sum().item() == 200
    seen = []
    objective = lambda logits, batch: seen.append(batch.y) or logits.sum()  # noqa: E731
    from kdaudit.conditions.objectives import Batch

    batch = Batch(torch.tensor([0, 1, 2, 3]), torch.zeros(4, 1), LABELS[:4])
    for spec in (clean, *[s for s in grid.students if s.teacher_id == noisy.run_id]):
        assert with_teacher_labels(spec, _Data(), objective) is objective  # clean labels
    with_teacher_labels(noisy, _Data(), objective)(torch.zeros(4, 10), batch)
    assert torch.equal(seen[-1], labels[:4])


# ----------------------------------------------------------------------------- the grid


def test_each_rate_is_one_teacher_with_its_own_students(tmp_path):
    grid = _specs(tmp_path)
    assert [t.label_noise for t in grid.teachers] == [None, 0.2]
    assert len(grid.students) == 2 * 2 * 3  # rates x student seeds x (siddo, kd, rcd)
    for teacher in grid.teachers:
        students = [s for s in grid.students if s.teacher_id == teacher.run_id]
        assert len(students) == 6 and {s.label_noise for s in students} == {teacher.label_noise}
    assert "noise0.2" in grid.teachers[1].run_id and "noise" not in grid.teachers[0].run_id
    # a control of a noisy teacher is the same training as the clean teacher's: same
    # init and data order, clean labels; only its teacher (and with it its run id) differs
    siddo = [s for s in grid.students if s.condition == "siddo" and s.student_seed == 10]
    assert replace(siddo[0], teacher_id=None) == replace(
        siddo[1], teacher_id=None, label_noise=None
    )


# run ids of configs without the sweep, as computed before it existed (commit 470852b)
RUN_IDS = {
    "configs/mnist1d.yaml": ("teacher_t0-62482e48d56f", "rcd_a0.9_T1_t0_s19-726bc91c02f7"),
    "configs/paper/svhn_resnet18.yaml": ("teacher_t0-3ea459f01ebc",
                                         "rcd_a0.9_T1_t2_s19-14d24a810c29"),
    "configs/paper/cpu/mnist1d_capacity.yaml": ("teacher_t0-5e5dc9021b89",
                                                "rcd_a0.9_T1_w1_t0_s15-e4dec2343348"),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(RUN_IDS))
def test_run_ids_of_configs_without_the_sweep_are_unchanged(path):
    runs = expand(load_config(ROOT / path)).runs
    assert (runs[0].run_id, runs[-1].run_id) == RUN_IDS[path]


def test_the_clean_rate_of_the_sweep_is_the_default_audit():
    default = expand(load_config(ROOT / "configs/mnist1d.yaml"))
    sweep = expand(load_config(ROOT / "configs/paper/cpu/mnist1d_teacher_noise.yaml"))
    ids = {r.run_id for r in default.runs if r.alpha in (None, 0.5, 0.9)}
    assert ids <= {r.run_id for r in sweep.runs}
    assert len(sweep.teachers) == 5 and len(sweep.students) == 5 * 10 * 5


def test_smoke_keeps_the_lowest_and_highest_rate(tmp_path):
    cfg = load_config(write_config(tmp_path, protocol={"teacher_label_noise": [0.0, 0.1, 0.4]}))
    assert smoke(cfg).protocol.teacher_label_noise == (0.0, 0.4)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "rates, words",
    [
        ([1.0], "outside [0, 1)"),
        ([-0.1], "outside [0, 1)"),
        ([0.1, 0.1], "listed twice"),
        ([], "empty"),
    ],
)
def test_bad_rates_are_errors_naming_the_key(tmp_path, rates, words):
    with pytest.raises(ConfigError, match=r"protocol\.teacher_label_noise") as err:
        load_config(write_config(tmp_path, protocol={"teacher_label_noise": rates}))
    assert words in str(err.value)


def test_a_pretrained_teacher_takes_no_noise(tmp_path):
    protocol = {"teacher_label_noise": [0.0, 0.1], "teacher_checkpoint": "t.pt"}
    with pytest.raises(ConfigError, match=r"teacher_label_noise: a pretrained teacher"):
        load_config(write_config(tmp_path, protocol=protocol))


# ----------------------------------------------------------------------------- old tables


def test_a_run_table_without_the_column_is_a_clean_teacher():
    runs = pd.DataFrame({"run_id": ["a", "b"], "teacher_seed": 0, "student_seed": [10, 10],
                         "condition": ["siddo", "kd"], "alpha": [math.nan, 0.5],
                         "temperature": [math.nan, 1.0], "metric": "accuracy",
                         "value": [0.5, 0.6]})  # fmt: skip
    assert (summarise(runs)["teacher_label_noise"] == 0.0).all()
    assert analyse(runs).settings[0].teacher_label_noise == 0.0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from kdaudit.api import run

    tmp_path = tmp_path_factory.mktemp("sweep")
    config = write_config(tmp_path, protocol={"teacher_label_noise": RATES})
    return run(config, tmp_path / "out"), expand(load_config(config))


def test_the_noisy_teacher_records_its_labels(sweep):
    result, grid = sweep
    store = RunStore(result.out)
    clean, noisy = (store.record(t.run_id) for t in grid.teachers)
    assert "label_noise" not in clean
    record = noisy["label_noise"]
    assert record["changed"] == round(0.2 * 300) and record["fraction"] == pytest.approx(0.2)
    assert 0.0 <= record["noisy_train_accuracy"] <= 1.0 and record["noisy_train_loss"] > 0
    teachers = load_teachers(result.out)
    assert teachers["teacher_label_noise"].tolist() == RATES
    assert teachers["label_noise_fraction"].tolist() == pytest.approx(RATES)


def test_students_see_clean_labels(sweep):
    """A noisy teacher's SIDDO and RCD students train exactly as the clean teacher's do."""
    result, _ = sweep
    runs = load_runs(result.out)
    acc = runs[(runs.metric == "accuracy") & runs.condition.isin(["siddo", "rcd"])]
    wide = acc.pivot_table(index=["condition", "student_seed"], columns="teacher_label_noise",
                           values="value")  # fmt: skip
    np.testing.assert_array_equal(wide[0.0], wide[0.2])


def test_the_sweep_flows_to_the_tables_and_summary(sweep):
    result, _ = sweep
    folder = Path(result.report).parent
    tidy = load_runs(result.out)
    assert sorted(tidy["teacher_label_noise"].unique()) == RATES
    noise = pd.read_csv(folder / "tables" / "teacher_noise.csv")
    assert noise["teacher_label_noise"].tolist() == RATES and (noise["alpha"] == 0.5).all()
    assert noise["label_noise_fraction"].tolist() == pytest.approx(RATES)
    for column in ("transfer", "transfer_p", "delta_correct_raw", "delta_incorrect_headroom",
                   "teacher_train_error_noisy", "accuracy"):  # fmt: skip
        assert noise[column].notna().all(), column
    assert (folder / "figures" / "teacher_noise.png").stat().st_size > 0
    summary = json.loads((folder / "summary.json").read_text())
    assert sorted(s["teacher_label_noise"] for s in summary["settings"]) == RATES
    assert [t["teacher_label_noise"] for t in summary["teachers"]] == RATES
    assert "noise 0.2" in (folder / "report.md").read_text()
    copied = pd.read_csv(folder / "tables" / "copied_errors.csv")  # each teacher's own mistakes
    assert sorted(copied["teacher_label_noise"].unique()) == RATES


def test_no_sweep_section_for_one_rate(tmp_path, tiny_config):
    from kdaudit.api import run

    result = run(tiny_config, tmp_path / "out")
    folder = Path(result.report).parent
    assert not (folder / "tables" / "teacher_noise.csv").exists()
    assert "noise" not in (folder / "report.md").read_text().lower()


def test_the_report_says_what_the_sweep_tested_and_export_refuses_it(sweep):
    from kdaudit.compare import CompareError
    from kdaudit.compare.export import export_manifest

    result, _ = sweep
    md = (Path(result.report).parent / "report.md").read_text()
    assert (
        "2 teachers (" in md and "one per rate of training labels replaced at random: 0, 0.2)" in md
    )
    with pytest.raises(CompareError, match="teacher-error sweep .* no manifest form"):
        export_manifest(result.out)
