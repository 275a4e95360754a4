"""The report on a synthetic audit: files, self-containment, content order, and a browser."""

from __future__ import annotations

import base64
import json
import os
import re
from html import escape
from pathlib import Path

import pytest

from kdaudit.report import verdict_lines, write_report
from kdaudit.report.intro import headline, striking_facts
from kdaudit.report.text import verdict_evidence
from kdaudit.stats import analyse
from tests.report_helpers import find_chromium, render_page, synthetic_runs, synthetic_teachers

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META = {"config": "synthetic", "commit": "abc1234", "runs complete": 90, "runs failed": 2}


@pytest.fixture(scope="module")
def audit():
    runs = synthetic_runs()
    return runs, synthetic_teachers(), analyse(runs)


@pytest.fixture(scope="module")
def report(audit, tmp_path_factory):
    runs, teachers, analysis = audit
    out = tmp_path_factory.mktemp("audit") / "report"
    index = write_report(out, runs, teachers, analysis, title="Synthetic audit", meta=META)
    return out, index


def test_synthetic_verdicts(audit):
    _, _, analysis = audit
    by_alpha = {s.alpha: s for s in analysis.settings}
    assert by_alpha[0.9].verdict == "supported" and by_alpha[0.1].verdict == "not_supported"
    assert by_alpha[0.9].paper_asymmetry.label == "negative"


def test_every_file_exists(report):
    out, index = report
    assert index == out / "index.html"
    for name in ["index.html", "report.md", "summary.json", "figures/agreement_deltas.png"]:
        assert (out / name).is_file(), name
    for table in ["teachers", "summary", "significance", "verdicts"]:
        for ext in ["csv", "tex"]:
            assert (out / "tables" / f"{table}.{ext}").stat().st_size > 0, f"{table}.{ext}"
    assert (out / "figures/agreement_deltas.png").read_bytes().startswith(PNG_MAGIC)


def test_summary_json(report, audit):
    out, _ = report
    text = (out / "summary.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert len(data["settings"]) == len(audit[2].settings)
    keys = {"teacher_seed", "condition", "alpha", "temperature", "verdict", "asymmetry"}
    keys |= {"delta_correct", "delta_incorrect", "best_control", "n"}
    for setting in data["settings"]:
        assert keys <= set(setting)
    siddo = next(c for c in data["conditions"] if c["condition"] == "siddo")
    assert siddo["alpha"] is None and siddo["n"] == 10
    assert set(siddo["means"]) >= {"accuracy", "activation_distance"}
    assert data["meta"]["commit"] == "abc1234"


def test_html_is_self_contained(report):
    _, index = report
    html = index.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_verdicts_come_first(report, audit):
    _, index = report
    html = index.read_text()
    sections = re.findall(r'<section id="([^"]+)"', html)
    # the synthetic audit has LS and RCD runs: their comparison comes before the notes
    facts = ["facts"] if striking_facts(audit[2]) else []
    expected = ["tested", "verdicts", *facts, "teachers", "summary", "significance", "matrix"]
    expected += ["asymmetry", "ls_vs_rcd"]
    assert sections == [*expected, "notes"]
    lines = verdict_lines(audit[2])
    assert len(lines) == 2
    first_table = html.index("<table")
    for s in audit[2].settings:  # the plain headline in bold, then the evidence, before tables
        lead = escape(headline(s))
        evidence = escape(verdict_evidence(s, audit[2].options))
        assert f"<strong>{lead}</strong> Evidence: {evidence}." in html
        assert html.index(lead) < first_table
    setting = audit[2].settings[1]
    assert "transfer supported" in lines[1]
    assert "the paper's single-baseline label: negative" in lines[1]
    if setting.asymmetry == "baseline-dependent":
        assert f"depends on the baseline: {setting.asymmetry_why}" in lines[1]
    else:
        assert setting.asymmetry == "negative"
        assert "the student copied the teacher's mistakes" in lines[1]
    assert "n=10" in lines[1] and lines[1].startswith("Teacher seed 0, KD alpha=0.9, T=1:")


def test_content_and_n(report):
    out, index = report
    html = index.read_text()
    assert "(n=10)" in html  # column headers of the mean ± SEM table
    assert re.search(r"<th scope=\"row\">siddo</th><td>10</td>", html)  # runs per condition
    assert "runs failed: 2" in html
    assert html.count("<details") >= 2 and 'title="seed 0: p=' in html
    assert "<strong>" in html  # best mean marked
    assert "activation distance ↓" in html and "accuracy ↑" in html
    md = (out / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Teachers")
    assert "](figures/agreement_deltas.png)" in md and "| metric |" in md
    tex = (out / "tables/summary.tex").read_text()
    assert r"\pm" in tex and r"\textbf{" in tex and "±" not in tex


def test_report_without_settings(tmp_path, audit):
    runs, teachers, _ = audit
    controls_only = runs[runs.condition != "kd"]
    index = write_report(tmp_path, controls_only, teachers, analyse(controls_only), title="t")
    assert "No KD settings" in index.read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["settings"] == []


def test_teachers_columns_checked(tmp_path, audit):
    runs, teachers, analysis = audit
    with pytest.raises(ValueError, match="test_accuracy"):
        write_report(tmp_path, runs, teachers.drop(columns="test_accuracy"), analysis, title="t")


@pytest.mark.browser
def test_renders_in_chromium(report, tmp_path):
    executable = find_chromium()
    if executable is None:
        if os.environ.get("KDAUDIT_REQUIRE_BROWSER"):  # set by .ci/run: no silent skip in CI
            pytest.fail("KDAUDIT_REQUIRE_BROWSER is set but headless Chromium is not installed")
        pytest.skip("headless Chromium not installed (apt-get install -y chromium)")
    _, index = report
    screenshot = REPO / "test-artifacts" / "report.png"
    page = render_page(executable, index, screenshot, tmp_path)
    assert page.errors == []
    assert page.images and all(i["complete"] and i["width"] > 0 for i in page.images), page.images
    assert page.resources == []
    assert page.first_section == "tested"  # what was tested, then the verdicts
    assert 0 < page.first_verdict_top < 900 - 100  # the first verdict on the first screen
    assert "transfer supported" in page.text
    assert screenshot.read_bytes().startswith(PNG_MAGIC)


def test_summary_json_robust_view_interface(tmp_path):
    """The exact names other code reads: settings[] with paper_asymmetry, asymmetry and
    asymmetry_matrix; tests[]; pooled[] over teacher seeds; the matrix CSVs."""
    runs = synthetic_runs(teacher_seeds=(0, 1))
    analysis = analyse(runs)
    out = tmp_path / "report"
    write_report(out, runs, synthetic_teachers((0, 1)), analysis, title="two teachers")
    data = json.loads((out / "summary.json").read_text())
    cell_keys = {"control", "scale", "n", "delta_correct", "delta_incorrect", "delta_correct_ci",
                 "delta_incorrect_ci", "p_negative", "p_positive", "label"}  # fmt: skip
    robust = {"negative", "positive", "symmetric", "baseline-dependent", "undetermined"}
    for row, setting in zip(data["settings"], analysis.settings, strict=True):
        assert row["asymmetry"] == setting.asymmetry and row["asymmetry"] in robust
        assert row["paper_asymmetry"] == setting.paper_asymmetry.label
        cells = row["asymmetry_matrix"]
        assert {(c["control"], c["scale"]) for c in cells} >= {
            (c, s) for c in ("siddo", "rcd") for s in ("raw", "headroom")}  # fmt: skip
        for c in cells:
            assert cell_keys <= set(c) and len(c["delta_correct_ci"]) == 2
            assert c["label"] in {"negative", "positive", "symmetric", "undetermined"}
    test_keys = {"teacher_seed", "condition", "alpha", "temperature", "width", "control",
                 "metric", "n", "statistic", "p", "p_adjusted", "significant", "effect_size",
                 "estimate", "ci_low", "ci_high"}  # fmt: skip
    assert data["tests"] and all(test_keys <= set(t) for t in data["tests"])
    assert len(data["tests"]) == len(analysis.tests_frame())
    assert len(data["pooled"]) == 2  # alpha 0.1 and 0.9, each over two teacher seeds
    for row in data["pooled"]:
        assert row["n_teachers"] == 2 and sum(row["verdicts"].values()) == 2
        assert row["asymmetry"] in robust and row["asymmetry_matrix"]
    matrix = (out / "tables" / "asymmetry_matrix.csv").read_text().splitlines()
    assert len(matrix) == 1 + sum(len(s.matrix) for s in analysis.settings)
    assert (out / "tables" / "asymmetry_matrix_pooled.csv").is_file()
    assert (out / "figures" / "asymmetry_matrix.png").read_bytes().startswith(PNG_MAGIC)
