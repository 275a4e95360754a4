"""The report's first screen for outsiders: what was tested, plain verdicts, an incomplete
grid and a teacher near chance said first, computed facts, a legend and a glossary."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from kdaudit.conditions import condition
from kdaudit.report import About, write_report
from kdaudit.report.intro import headline, striking_facts
from kdaudit.stats import analyse
from tests.report_helpers import synthetic_runs, synthetic_teachers


@pytest.fixture(scope="module")
def audit():
    runs = synthetic_runs()
    return runs, synthetic_teachers(), analyse(runs)


def _write(tmp_path, runs, teachers, analysis, about=None):
    index = write_report(tmp_path / "report", runs, teachers, analysis, title="t",
                         meta={"config": "c"}, about=about)  # fmt: skip
    return index.read_text(), (tmp_path / "report" / "report.md").read_text()


def test_what_was_tested_spells_out_the_controls_and_the_setup(tmp_path, audit):
    about = About(dataset="mnist1d", teacher_model="mlp", num_classes=10)
    html, md = _write(tmp_path, *audit, about=about)
    section = md[md.index("## What was tested") : md.index("## Verdicts")]
    assert (
        "One teacher (mlp, seed 0), trained on mnist1d to test accuracy 0.952 (chance: 0.1)"
        in section
    )
    assert "was distilled into students of the same architecture" in section
    for name in ("siddo", "rcd", "ls"):  # every control present, its long name and meaning
        entry = condition(name)
        assert f"**{entry.label} ({entry.long_name.lower()})**: {entry.plain}." in section
    assert "α = 0.1, 0.9" in section and "up to 10 paired student seeds" in section
    assert md.index("## What was tested") < md.index("## Verdicts") < md.index("## Teachers")


def test_each_verdict_is_one_bold_plain_sentence_then_its_evidence(tmp_path, audit):
    _, md = _write(tmp_path, *audit)
    strong = next(s for s in audit[2].settings if s.alpha == 0.9)
    weak = next(s for s in audit[2].settings if s.alpha == 0.1)
    assert f"- **{headline(strong)}** Evidence: transfer supported" in md
    assert "the student learned from the teacher" in headline(strong)
    assert headline(weak).endswith("(transfer not supported).")  # no asymmetry claim
    assert "copied" not in headline(weak)


def test_an_incomplete_grid_is_said_on_the_first_line_and_in_every_verdict(tmp_path, audit):
    html, md = _write(tmp_path, *audit, about=About(runs_complete=40, runs_total=71))
    first = md.splitlines()[2]  # after the title and a blank line
    assert first.startswith("> **Incomplete grid: 40 of 71 runs complete.")
    leads = re.findall(r"^- \*\*(.+?)\*\* Evidence", md, re.M)
    assert len(leads) == len(audit[2].settings)
    assert all(lead.startswith("(Incomplete grid) ") for lead in leads)
    assert html.index('class="notice"') < html.index("<section")
    _, complete = _write(tmp_path, *audit, about=About(runs_complete=71, runs_total=71))
    assert "Incomplete grid" not in complete


@pytest.mark.parametrize("accuracy, warned", [(0.12, True), (0.149, True), (0.151, False)])
def test_a_teacher_near_chance_is_warned_about_first(tmp_path, audit, accuracy, warned):
    runs, teachers, analysis = audit
    teachers = teachers.assign(test_accuracy=accuracy)
    _, md = _write(tmp_path, runs, teachers, analysis, about=About(num_classes=10))
    notice = "Teacher seed 0 is near chance: test accuracy"
    assert (notice in md) is warned
    if warned:
        assert md.index(notice) < md.index("## ")


def _with_rcd_accuracy(runs: pd.DataFrame, alpha: float, shift: float) -> pd.DataFrame:
    runs = runs.copy()
    rows = (runs.condition == "rcd") & (runs.alpha == alpha) & (runs.metric == "accuracy")
    runs.loc[rows, "value"] += shift
    return runs


def test_a_control_more_accurate_than_kd_is_stated_with_its_paired_interval(audit):
    runs = _with_rcd_accuracy(audit[0], 0.9, 0.08)
    facts = striking_facts(analyse(runs))
    fact = next(f for f in facts if "more accurate" in f)
    acc = runs[(runs.metric == "accuracy") & (runs.alpha == 0.9)]
    kd = acc[acc.condition == "kd"].set_index("student_seed").value
    rcd = acc[acc.condition == "rcd"].set_index("student_seed").value
    gap = 100 * (rcd.mean() - kd.mean())  # computed here from the runs, independently
    assert fact.startswith(f"The RCD students are {gap:.1f} points more accurate than the KD "
                           "students at alpha=0.9, T=1")  # fmt: skip
    walsh = [(a + b) / 2 for i, a in enumerate(kd - rcd) for b in list(kd - rcd)[i:]]
    assert f"KD − RCD {np.median(walsh):+.3g} [" in fact  # the Hodges-Lehmann estimate
    assert "without the teacher, did better than distillation" in fact


def test_no_accuracy_fact_when_the_paired_interval_includes_zero(audit):
    runs = _with_rcd_accuracy(audit[0], 0.9, 0.0)  # KD is the more accurate here
    assert not any("more accurate" in f for f in striking_facts(analyse(runs)))


def test_a_verdict_that_differs_between_teacher_seeds_is_stated():
    runs = synthetic_runs(teacher_seeds=(0, 1, 2))
    # teacher seed 2's KD students at alpha 0.9 are copies of its RCD students: no transfer
    kd = (runs.teacher_seed == 2) & (runs.condition == "kd") & (runs.alpha == 0.9)
    rcd = (runs.teacher_seed == 2) & (runs.condition == "rcd") & (runs.alpha == 0.9)
    runs.loc[kd, "value"] = runs.loc[rcd, "value"].to_numpy() + 1e-4
    analysis = analyse(runs)
    verdicts = {s.teacher_seed: s.verdict for s in analysis.settings if s.alpha == 0.9}
    assert verdicts[0] == "supported" and verdicts[2] != "supported"
    fact = next(f for f in striking_facts(analysis) if "differs between teacher seeds" in f)
    assert fact.startswith("KD alpha=0.9, T=1: the verdict differs between teacher seeds (2 "
                           "supported, 1 ")  # fmt: skip


def test_legend_in_the_page_only_and_a_glossary_of_the_conditions_present(tmp_path, audit):
    html, md = _write(tmp_path, *audit)
    legend = re.search(r'<ul class="legend"[^>]*>(.*?)</ul>', html).group(1)
    assert re.findall(r'class="([a-z_]+)"', legend) == ["supported", "marginal",
                                                        "not_supported", "insufficient_n"]  # fmt: skip
    assert 'class="legend"' not in md
    glossary = md[md.index("### Glossary") :]
    for name in ("kd", "siddo", "rcd", "ls"):
        assert f"**{condition(name).label} (" in glossary
    assert "**DISDO" not in glossary  # not in this grid
    for term in ("Δcorrect, Δincorrect", "raw and headroom scales", "asymmetry", "p, FDR"):
        assert f"**{term}**" in glossary
    assert md.index("### Glossary") < md.index("## Teachers")


def test_a_smoke_run_says_first_that_its_verdicts_are_not_evidence(tiny_config, tmp_path):
    from kdaudit.cli import main

    out = tmp_path / "smoke"
    assert main(["run", str(tiny_config), "--smoke", "--out", str(out), "--device", "cpu"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert md.splitlines()[2].startswith("> **Smoke run: a tiny grid")
    assert "Its verdicts are not evidence" in md
    full = tmp_path / "full"
    assert main(["run", str(tiny_config), "--out", str(full), "--device", "cpu"]) == 0
    assert "Smoke run" not in (full / "report" / "report.md").read_text()
