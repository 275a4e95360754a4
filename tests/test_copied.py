"""The evidence behind the claim: which teacher mistakes were copied (kdaudit.store.copied,
kdaudit.stats.copied), by hand and against the stored logits of a real tiny audit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kdaudit.config import load_config
from kdaudit.data import load_data
from kdaudit.executors import run_local
from kdaudit.protocol import expand
from kdaudit.stats.copied import copied_class_pairs, copied_errors
from kdaudit.store import RunStore
from kdaudit.store.copied import TEST_LABELS, copied_predictions, load_test_labels


def _long(rows):
    columns = ["teacher_seed", "example", "label", "teacher_prediction", "condition", "alpha",
               "temperature", "width", "n_runs", "copy_rate"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def test_excess_and_class_pairs_by_hand():
    nan = math.nan
    rates = {  # example -> (kd a=0.9, siddo, rcd a=0.9)
        7: (1.0, 0.1, 0.0),  # copied by KD far more than by any control: excess 0.9
        8: (0.2, 0.3, 0.5),  # copied more by RCD: excess 0.2 - 0.5
        9: (0.6, 0.2, 0.1),  # same class pair as 7: excess 0.4
    }
    pair = {7: (4, 9), 8: (1, 2), 9: (4, 9)}
    rows = []
    for example, (kd, siddo, rcd) in rates.items():
        label, wrong = pair[example]
        rows += [[0, example, label, wrong, "kd", 0.9, 1.0, nan, 10, kd],
                 [0, example, label, wrong, "siddo", nan, nan, nan, 10, siddo],
                 [0, example, label, wrong, "rcd", 0.9, 1.0, nan, 10, rcd]]  # fmt: skip
    errors = copied_errors(_long(rows))
    assert list(errors["example"]) == [7, 9, 8]
    assert list(errors.columns[4:7]) == ["kd a=0.9", "siddo", "rcd a=0.9"]  # treatment first
    assert errors["excess"].tolist() == pytest.approx([0.9, 0.4, -0.3])
    pairs = copied_class_pairs(errors)
    first = pairs.iloc[0]
    assert (first["label"], first["teacher_prediction"], first["n_examples"]) == (4, 9, 2)
    assert first["kd a=0.9"] == pytest.approx(0.8) and first["siddo"] == pytest.approx(0.15)
    assert first["excess"] == pytest.approx(0.8 - 0.15)  # max of the averaged rates
    assert first["extra_copies"] == pytest.approx(2 * 0.65)


def test_copy_rates_from_a_real_audit(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    out = tmp_path / "out"
    run_local(cfg, out, "cpu")
    labels = load_test_labels(out, cfg)
    data_labels = load_data(cfg.data).labels("test").numpy()
    np.testing.assert_array_equal(labels, data_labels)
    assert (out / TEST_LABELS).is_file()  # kept: later reports need no data
    np.testing.assert_array_equal(np.load(out / TEST_LABELS), data_labels)
    grid = expand(cfg)
    copied = copied_predictions(out, grid, labels)
    store = RunStore(out)
    teacher_pred = np.asarray(store.array(grid.teachers[0].run_id, "test_logits")).argmax(1)
    wrong = np.flatnonzero(teacher_pred != labels)
    assert len(wrong) > 0 and set(copied["example"]) == set(wrong.tolist())
    for (condition, alpha), group in copied.groupby(["condition", "alpha"], dropna=False):
        runs = [s for s in grid.students if s.condition == condition
                and (s.alpha == alpha or (s.alpha is None and math.isnan(alpha)))]  # fmt: skip
        preds = [np.asarray(store.array(s.run_id, "test_logits")).argmax(1) for s in runs]
        by_hand = np.mean([p[wrong] == teacher_pred[wrong] for p in preds], axis=0)
        group = group.set_index("example").loc[wrong]
        np.testing.assert_allclose(group["copy_rate"], by_hand)
        assert (group["n_runs"] == len(runs)).all()
        assert (group["teacher_prediction"] == teacher_pred[wrong]).all()


def test_label_names_come_from_the_data_and_reach_the_tables():
    from types import SimpleNamespace

    from kdaudit.store.copied import label_names

    assert label_names(SimpleNamespace(vocab="\n ab")) == ["\\n", "␣", "a", "b"]
    assert label_names(SimpleNamespace(class_names=("cat", "dog"))) == ["cat", "dog"]
    assert label_names(SimpleNamespace()) is None
    nan = math.nan
    rows = [
        [0, 5, 1, 0, "kd", 0.9, 1.0, nan, 4, 0.75],
        [0, 5, 1, 0, "siddo", nan, nan, nan, 4, 0.25],
    ]
    named = _long(rows).assign(label_name="dog", teacher_prediction_name="cat")
    errors = copied_errors(named)
    assert errors.loc[0, "label_name"] == "dog" and errors.loc[0, "excess"] == pytest.approx(0.5)
    pairs = copied_class_pairs(errors)
    assert (pairs.loc[0, "label_name"], pairs.loc[0, "teacher_prediction_name"]) == ("dog", "cat")
