"""The paper's experiment axes (PROTOCOL section 7): temperature, LS vs RCD, smaller and
scaled-width students, a teacher trained on other data; the grid, the statistics, the report."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kdaudit.config import ConfigError, load_config
from kdaudit.data import load_data
from kdaudit.engine.evaluate import predict
from kdaudit.engine.loop import batch_order
from kdaudit.engine.teachers import Teachers
from kdaudit.executors import run_local
from kdaudit.models import build_model
from kdaudit.protocol import expand, smoke
from kdaudit.report import write_report
from kdaudit.stats import analyse, delta_sweep, equivalence_differences, targeted_summary
from kdaudit.store import RunStore
from kdaudit.store.tables import load_runs, load_teachers, targeted_transfer
from kdaudit.store.targeted import completion_counts, prompt_rows
from tests.conftest import write_config
from tests.report_helpers import _run_rows, synthetic_teachers
from tests.test_text import write_text

ROOT = Path(__file__).parents[1]
# sha256 of the newline-joined run ids of configs/mnist1d.yaml's grid: adding a grid axis
# (a field at its default is not hashed) must not rename the runs of an existing grid.
MNIST1D_GRID_DIGEST = "aabd4fded5ba9983"


def test_default_grid_run_ids_are_unchanged():
    ids = [r.run_id for r in expand(load_config(ROOT / "configs/mnist1d.yaml")).runs]
    assert ids[0] == "teacher_t0-62482e48d56f"
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == MNIST1D_GRID_DIGEST
    assert all("_w" not in i for i in ids)


# ----------------------------------------------------------------------------- width axis


def _capacity_config(tmp_path, widths=(0.25, 0.5, 1.0)):
    protocol = {"student_widths": list(widths), "conditions": ["siddo", "kd", "rcd", "ls"]}
    return load_config(write_config(tmp_path, protocol=protocol))


def test_width_axis_scales_the_student_and_names_the_run(tmp_path):
    grid = expand(_capacity_config(tmp_path))  # teacher: mlp width 16
    assert len(grid.students) == 2 * 3 * 4  # student seeds x widths x conditions (one alpha)
    assert len({s.run_id for s in grid.runs}) == len(grid.runs)
    for s in grid.students:
        assert s.model.width == round(16 * s.width)
        assert f"_w{s.width:g}_" in s.label
    assert grid.teachers[0].width is None and grid.teachers[0].model.width == 16


def test_pairing_holds_within_each_width(tmp_path):
    """Per (student seed, width) every condition: the same init weights and minibatches."""
    cfg = _capacity_config(tmp_path)
    grid = expand(cfg)
    data = load_data(cfg.data)
    groups: dict[tuple, list] = {}
    for s in grid.students:
        groups.setdefault((s.student_seed, s.width), []).append(s)
    for (seed, _), specs in groups.items():
        first = build_model(specs[0].model, data.input_shape, 10, specs[0].init_seed).state_dict()
        order = torch.cat(list(batch_order(data.n_train, specs[0].train, specs[0].data_seed)))
        for spec in specs:
            # every width is a smaller-student setting: init seed = student seed
            assert spec.init_seed == seed and spec.data_seed == seed
            state = build_model(spec.model, data.input_shape, 10, spec.init_seed).state_dict()
            assert all(torch.equal(first[k], state[k]) for k in first)
            again = torch.cat(list(batch_order(data.n_train, spec.train, spec.data_seed)))
            assert torch.equal(order, again)


def test_temperature_axis_keeps_the_pairing(tmp_path):
    """KD and RCD at every T of one student seed: SIDDO's init, model, data order, training."""
    cfg = load_config(write_config(tmp_path, protocol={"temperatures": [1.0, 2.0, 4.0]}))
    grid = expand(cfg)
    assert len(grid.students) == 2 * (1 + 3 + 3)
    for seed in (10, 11):
        specs = [s for s in grid.students if s.student_seed == seed]
        shared = {(s.init_seed, s.data_seed, s.model, s.train, s.data) for s in specs}
        assert len(shared) == 1 and specs[0].init_seed == grid.teachers[0].init_seed
        temps = sorted(s.temperature for s in specs if s.condition == "kd")
        assert temps == [1.0, 2.0, 4.0]


def test_widths_round_to_what_the_architecture_allows():
    cfg = load_config(
        ROOT / "configs/paper/tinyshakespeare_nanogpt.yaml",
        ["protocol.student_widths=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]",
         "protocol.conditions=[siddo]", "protocol.teacher_seeds=[0]",
         "protocol.student_seeds=[10]"],
    )  # fmt: skip
    widths = [s.model.n_embd for s in expand(cfg).students]
    assert widths == [36, 78, 114, 156, 192, 228, 270, 306, 348, 384]  # multiples of n_head 6


def test_a_model_without_a_width_field_is_a_config_error(tmp_path):
    cfg = load_config(
        write_config(tmp_path, model={"name": "resnet18"}, protocol={"student_widths": [0.5]})
    )
    with pytest.raises(ConfigError, match="declares no width field.*mlp"):
        expand(cfg)
    with pytest.raises(ConfigError, match="outside"):
        load_config(write_config(tmp_path, protocol={"student_widths": [0.0]}))
    with pytest.raises(ConfigError, match="twice"):
        load_config(write_config(tmp_path, protocol={"student_widths": [0.5, 0.5]}))


def test_smoke_keeps_the_smallest_and_largest_width(tmp_path):
    cfg = smoke(_capacity_config(tmp_path, widths=(0.5, 0.1, 1.0, 0.3)))
    assert cfg.protocol.student_widths == (0.1, 1.0)


def test_teacher_data_trains_the_teacher_only(tmp_path):
    other = {"name": "mnist1d", "n_train": 200, "n_test": 120}
    cfg = load_config(write_config(tmp_path, protocol={"teacher_data": other}))
    grid = expand(cfg)
    assert grid.teachers[0].data.n_train == 200
    assert all(s.data == cfg.data and s.data.n_train == 300 for s in grid.students)
    plain = expand(load_config(write_config(tmp_path)))
    assert grid.teachers[0].run_id != plain.teachers[0].run_id
    assert plain.teachers[0].data == cfg.data


def test_a_capacity_grid_runs_and_is_analysed_per_width(tmp_path):
    cfg = _capacity_config(tmp_path, widths=(0.5, 1.0))
    out = tmp_path / "out"
    outcome = run_local(cfg, out, device="cpu")
    assert not outcome.failed
    runs = load_runs(out)
    assert sorted(runs["width"].unique()) == [0.5, 1.0]
    analysis = analyse(runs)
    assert sorted((s.width, s.n) for s in analysis.settings) == [(0.5, 2), (1.0, 2)]
    for s in analysis.settings:  # each KD setting compared with controls of its own width
        assert {c.control for c in s.comparisons} == {"siddo", "rcd", "ls"}
        assert all(c.width == s.width and c.n == 2 for c in s.comparisons)
    report = out / "report"
    write_report(report, runs, load_teachers(out), analysis, title="capacity")
    sweep = pd.read_csv(report / "tables/capacity_scaling.csv")
    assert list(sweep["width"]) == [0.5, 1.0] and list(sweep["n"]) == [2, 2]
    assert (report / "figures/capacity_scaling.png").is_file()
    assert not (report / "figures/temperature.png").exists()
    assert "w=0.5" in (report / "report.md").read_text()


# ----------------------------------------------------------------------------- statistics


def _synthetic(temperatures=(1.0,), widths=(math.nan,), teacher_seeds=(0,), ls=False):
    """SIDDO, KD and RCD per (alpha, T, width); KD transfers (negative asymmetric) at alpha 0.9."""
    rng = np.random.default_rng(1)
    rows = []
    for t in teacher_seeds:
        for s in range(10, 20):
            for w in widths:
                runs = _run_rows(rng, t, s, "siddo", math.nan, math.nan, 0.0)
                for a in (0.1, 0.9):
                    for temp in temperatures:
                        runs += _run_rows(rng, t, s, "kd", a, temp, 0.3 if a > 0.5 else 0.0)
                        runs += _run_rows(rng, t, s, "rcd", a, temp, 0.0)
                    if ls:
                        runs += _run_rows(rng, t, s, "ls", a, math.nan, 0.0)
                rows += [dict(r, width=w, run_id=f"{r['run_id']}-w{w}") for r in runs]
    return pd.DataFrame(rows)


def test_settings_are_grouped_per_width():
    runs = _synthetic(widths=(0.5, 1.0))
    analysis = analyse(runs)
    assert len(analysis.settings) == 2 * 2  # widths x alphas, 10 pairs each (no mixing)
    assert all(s.n == 10 and s.comparison("siddo").n == 10 for s in analysis.settings)
    verdicts = analysis.verdicts_frame()
    assert set(verdicts["width"]) == {0.5, 1.0}
    strong = verdicts[verdicts["alpha"] == 0.9]
    assert (strong["verdict"] == "supported").all()
    assert (strong["paper_asymmetry"] == "negative").all()


def test_delta_sweep_pools_teacher_seeds():
    runs = _synthetic(temperatures=(1.0, 2.0, 4.0), teacher_seeds=(0, 1))
    analysis = analyse(runs)
    sweep = delta_sweep(analysis)
    assert len(sweep) == 2 * 3 and (sweep["n"] == 20).all() and (sweep["n_teachers"] == 2).all()
    per_seed = analysis.asymmetry_frame()
    one = per_seed[(per_seed["alpha"] == 0.9) & (per_seed["temperature"] == 2.0)]
    row = sweep[(sweep["alpha"] == 0.9) & (sweep["temperature"] == 2.0)].iloc[0]
    assert row["delta_incorrect"] == pytest.approx(one["d_incorrect"].mean())
    assert row["sem_correct"] == pytest.approx(one["d_correct"].std(ddof=1) / np.sqrt(20))
    diff = one["d_incorrect"] - one["d_correct"]
    assert row["asymmetry"] == pytest.approx(diff.mean())
    assert row["n_transfer"] == 2


def test_ls_rcd_differences_by_hand():
    keys = dict(teacher_seed=0, alpha=0.5, width=math.nan, metric="accuracy")
    rows = []
    for seed, ls_value, rcd_value in ((10, 0.80, 0.81), (11, 0.70, 0.67), (12, 0.75, 0.75)):
        rows.append(dict(keys, run_id=f"l{seed}", student_seed=seed, condition="ls",
                         temperature=math.nan, value=ls_value))  # fmt: skip
        rows.append(dict(keys, run_id=f"r{seed}", student_seed=seed, condition="rcd",
                         temperature=1.0, value=rcd_value))  # fmt: skip
    # RCD at T = 2 is not LS's equal: never paired with it
    rows.append(dict(keys, run_id="r2", student_seed=10, condition="rcd", temperature=2.0,
                     value=0.1))  # fmt: skip
    frame = equivalence_differences(pd.DataFrame(rows), "ls", "rcd", (("temperature", 1.0),))
    (row,) = frame.itertuples()
    assert row.n == 3
    assert row.max_abs_paired_diff == pytest.approx(0.03)
    assert row.abs_mean_diff == pytest.approx(abs(0.75 - 0.7433333333))


# ----------------------------------------------------------------------------- report


def test_temperature_figure_and_table(tmp_path):
    runs = _synthetic(temperatures=(1.0, 2.0, 4.0), ls=True)
    out = tmp_path / "report"
    write_report(out, runs, synthetic_teachers(), analyse(runs), title="temperature")
    png = out / "figures/temperature.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    table = pd.read_csv(out / "tables/temperature.csv")
    assert sorted(zip(table["alpha"], table["temperature"], strict=True)) == [
        (a, t) for a in (0.1, 0.9) for t in (1.0, 2.0, 4.0)
    ]
    assert (out / "tables/temperature.tex").is_file()
    assert not (out / "figures/capacity_scaling.png").exists()
    html = (out / "index.html").read_text()
    assert 'id="temperature"' in html and 'id="ls_vs_rcd"' in html
    ls_rcd = pd.read_csv(out / "tables/ls_vs_rcd.csv")
    assert set(ls_rcd["alpha"]) == {0.1, 0.9}
    largest = ls_rcd["max_abs_paired_diff"].max()
    assert f"{largest:.3g}" in (out / "report.md").read_text()


def test_one_temperature_and_no_ls_add_no_sections(tmp_path):
    runs = _synthetic()
    out = tmp_path / "report"
    write_report(out, runs, synthetic_teachers(), analyse(runs), title="plain")
    assert not (out / "figures/temperature.png").exists()
    assert not (out / "tables/ls_vs_rcd.csv").exists()
    assert 'id="temperature"' not in (out / "index.html").read_text()


# ----------------------------------------------------------------------------- targeted


def test_prompt_rows_and_completion_counts_by_hand():
    vocab = " aehtx"
    text = "the tha thx t"
    tokens = np.array([vocab.index(c) for c in text])
    rows = prompt_rows(tokens, vocab, "th")
    # row i predicts character i + 1: "th" ends at characters 1, 5 and 9
    assert rows.tolist() == [1, 5, 9]
    logits = np.zeros((len(text) - 1, len(vocab)), dtype=np.float32)
    logits[1, vocab.index("a")] = 1.0  # predicts "tha" where the text says "the"
    logits[5, vocab.index("e")] = 1.0
    logits[9, vocab.index("e")] = 1.0
    logits[2, vocab.index("a")] = 5.0  # not a prompt row: never counted
    counts = completion_counts(logits, rows, vocab, ("a", "e", "x"))
    assert counts == {"a": 1, "e": 2, "x": 0}
    assert prompt_rows(tokens[:2], vocab, "th").size == 0  # no row after the last character


def test_targeted_summary_mean_sem_per_condition():
    rows = [dict(run_id=f"kd{s}", teacher_seed=0, student_seed=s, condition="kd", alpha=0.9,
                 temperature=1.0, width=math.nan, completion=c, count=n)
            for s, a, e in ((10, 4, 6), (11, 6, 2)) for c, n in (("a", a), ("e", e))]  # fmt: skip
    rows += [dict(run_id="t", teacher_seed=0, student_seed=None, condition="teacher",
                  alpha=math.nan, temperature=math.nan, width=math.nan, completion=c, count=n)
             for c, n in (("a", 7), ("e", 1))]  # fmt: skip
    summary = targeted_summary(pd.DataFrame(rows)).set_index("condition")
    assert summary.loc["kd", "n"] == 2 and summary.loc["kd", "a_mean"] == 5.0
    assert summary.loc["kd", "e_sem"] == pytest.approx(2.0)  # std 2.83 / sqrt 2
    assert summary.loc["teacher", "a_mean"] == 7 and math.isnan(summary.loc["teacher", "a_sem"])


def test_a_teacher_on_other_text_is_compared_on_the_students_text(tmp_path, monkeypatch):
    monkeypatch.setattr("kdaudit.data.files.checksum_ok", lambda path, resource: True)
    data_dir = tmp_path / "data"
    write_text(data_dir)
    text = {"name": "tinyshakespeare", "block_size": 8, "download": False}
    gpt = {"name": "nanogpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    train = {"batch_size": 4, "epochs": 1, "max_steps": 20, "lr": 0.01, "eval_batch_size": 64}
    protocol = {"teacher_data": {**text, "name": "tinyshakespeare_tha"}, "alphas": [0.9]}
    cfg = load_config(write_config(tmp_path, data=text, model=gpt, train=train, protocol=protocol))
    out = tmp_path / "out"
    assert not run_local(cfg, out, device="cpu", data_dir=data_dir).failed
    grid, store = expand(cfg), RunStore(out)
    clean = load_data(cfg.data, data_dir)
    teacher = grid.teachers[0]
    assert teacher.students_data == cfg.data and teacher.data.name == "tinyshakespeare_tha"
    model = Teachers(store, torch.device("cpu")).model(teacher.run_id, clean)
    on_clean = predict(model, clean, "test", 64)  # (N_test, V), by hand
    # its stored outputs are on its own text; its students are compared on theirs
    assert not np.allclose(store.array(teacher.run_id, "test_logits"), on_clean.numpy())
    labels = clean.labels("test")
    correct = int((on_clean.argmax(1) == labels).sum())
    for student in grid.students:
        assert store.record(student.run_id)["similarity"]["n_teacher_correct"] == correct
    counts = targeted_transfer(out, cfg, grid, data_dir)
    rows = prompt_rows(clean.test_tokens.numpy(), clean.vocab, "th")
    assert rows.size > 0
    expected = completion_counts(on_clean.numpy(), rows, clean.vocab, ("a", "e"))
    got = counts[counts["condition"] == "teacher"].set_index("completion")["count"]
    assert got.to_dict() == expected
    assert set(counts["condition"]) == {"teacher", "siddo", "kd", "rcd"}


# ----------------------------------------------------------------------------- teacher regime


def test_teacher_train_overrides_the_teachers_only(tmp_path):
    cfg = load_config(write_config(tmp_path, protocol={"teacher_train": {"epochs": 5}}))
    grid = expand(cfg)
    teacher = grid.teachers[0]
    # unstated keys come from `train`; students keep `train`
    assert teacher.train.epochs == 5 and teacher.train.lr == cfg.train.lr == 0.01
    assert all(s.train == cfg.train for s in grid.students)
    assert teacher.run_id != expand(load_config(write_config(tmp_path))).teachers[0].run_id
    assert smoke(cfg).protocol.teacher_train.max_steps == 40
    with pytest.raises(ConfigError, match="augment"):
        load_config(write_config(tmp_path, protocol={"teacher_train": {"augment": "mixup"}}))


def test_teacher_transfer_table_sets_train_loss_beside_the_deltas(tmp_path):
    runs = _synthetic(teacher_seeds=(0, 1))
    teachers = synthetic_teachers((0, 1))
    out = tmp_path / "report"
    write_report(out, runs, teachers, analyse(runs), title="regime")
    table = pd.read_csv(out / "tables/teacher_transfer.csv")
    assert len(table) == 2 * 2  # teacher seeds x alphas
    one = table[(table["teacher_seed"] == 1) & (table["alpha"] == 0.9)].iloc[0]
    assert one["train_loss"] == pytest.approx(teachers["train_loss"].iloc[1])
    assert one["verdict"] == "supported" and one["delta_incorrect"] > one["delta_correct"]
    assert "Each teacher's train loss beside the transfer" in (out / "report.md").read_text()


def test_the_report_sets_another_audits_teachers_beside_its_own(tmp_path):
    """The teacher-regime experiment: two audits that differ only in how the teacher
    trained, their teachers' train loss beside the transfer each produced, in one report."""
    from kdaudit import api

    standard = load_config(write_config(tmp_path))
    run_local(standard, tmp_path / "standard", "cpu")
    regime = load_config(write_config(tmp_path, name="regime",
                                      protocol={"teacher_train": {"lr": 0.03}}))  # fmt: skip
    run_local(regime, tmp_path / "regime", "cpu")
    api.report(tmp_path / "regime", beside=[tmp_path / "standard"])
    table = pd.read_csv(tmp_path / "regime/report/tables/teacher_transfer.csv")
    assert dict(zip(table["audit"], table["teacher_training"], strict=True)) == {
        "regime": "lr=0.03", "tiny": "as the students"}  # fmt: skip
    for audit, folder in (("regime", "regime"), ("tiny", "standard")):
        loss = load_teachers(tmp_path / folder)["train_loss"].iloc[0]
        assert table.loc[table["audit"] == audit, "train_loss"].tolist() == [loss]  # one alpha
    assert table["train_loss"].nunique() == 2  # the teachers did train differently
    assert "| regime | lr=0.03 |" in (tmp_path / "regime/report/report.md").read_text()
