"""The report on a synthetic audit: files, self-containment, content order, and a browser."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from kdaudit.report import verdict_lines, write_report
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
    assert by_alpha[0.9].asymmetry.label == "negative"


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
    expected = ["verdicts", "teachers", "summary", "significance", "asymmetry", "ls_vs_rcd"]
    assert sections == [*expected, "notes"]
    lines = verdict_lines(audit[2])
    assert len(lines) == 2
    first_table = html.index("<table")
    for line in lines:
        escaped = line.replace("'", "&#x27;")
        assert escaped in html and html.index(escaped) < first_table
    assert "transfer supported" in lines[1] and "negative asymmetric" in lines[1]
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
    assert page.first_section == "verdicts"
    assert "transfer supported" in page.text
    assert screenshot.read_bytes().startswith(PNG_MAGIC)
