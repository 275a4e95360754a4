"""The audit report: verdicts first, then the tables and the figure behind them.

Reads only the run table, the teacher table and the analysis it is given; it never
trains, and never touches the engine or the store. Numbers are formatted only here.

    DIR/report/index.html       one self-contained page (inline CSS, PNGs as data URIs)
    DIR/report/report.md        the same content as Markdown
    DIR/report/summary.json     verdicts and per-condition means (NaN -> null)
    DIR/report/tables/*.csv     full-precision tables; *.tex the formatted ones
    DIR/report/figures/*.png

Sections that only some grids have: temperature.png / temperature.csv when the KD settings
span more than one temperature, capacity_scaling.png / capacity_scaling.csv when they span
more than one student width, A_vs_B.csv for a condition A that its registry entry says equals
B when both have runs (ls_vs_rcd.csv: LS and RCD at T = 1), targeted_transfer.csv when given
prompt-completion counts (kdaudit.store.tables.targeted_counts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from kdaudit import __version__
from kdaudit.conditions import CONDITIONS, label
from kdaudit.metrics import TOPK_MARK
from kdaudit.report import figures, fmt, html, intro, latex, markdown, tables
from kdaudit.report.blocks import (
    Bullets,
    Details,
    Figure,
    Legend,
    Notice,
    Paragraph,
    Section,
    Table,
)
from kdaudit.report.intro import About
from kdaudit.report.summary import summary_json
from kdaudit.report.text import (
    equivalence_sentence,
    protocol_notes,
    verdict_evidence,
    verdict_lines,
)
from kdaudit.stats import (
    Analysis,
    delta_sweep,
    equivalence_differences,
    summarise,
    targeted_summary,
)
from kdaudit.stats.copied import copied_class_pairs, copied_errors
from kdaudit.stats.remedies import remedies_frame

__all__ = ["About", "verdict_lines", "write_report"]

COPIED_ROWS = 10  # rows of each copied-mistakes table shown in the page

DELTA_FIGURE = "figures/agreement_deltas.png"
MATRIX_FIGURE = "figures/asymmetry_matrix.png"
# grid axis -> (file stem of its figure and table, section title)
SWEEPS = {
    "temperature": ("temperature", "Temperature: agreement deltas against T"),
    "width": ("capacity_scaling", "Capacity scaling: agreement deltas against student width"),
}


@dataclass(frozen=True)
class _Content:
    teachers: pd.DataFrame  # full precision
    summary: pd.DataFrame  # full precision, from stats.summarise
    counts: dict[tuple, int]  # runs per (teacher seed, condition key)
    summary_tables: tuple[Table, ...]
    deltas_png: bytes
    matrix_png: bytes  # the asymmetry matrix, on the first screen
    sweep: pd.DataFrame  # stats.delta_sweep: deltas per (alpha, T, width)
    sweep_pngs: dict[str, bytes]  # axis -> figure, for the axes that vary
    # condition -> stats.equivalence_differences with the condition it equals (LS and RCD),
    # for those with runs of both
    equal: dict[str, pd.DataFrame]
    targeted: pd.DataFrame | None  # stats.targeted_summary, when counts were given
    copied: pd.DataFrame | None  # stats.copied.copied_errors, when the test labels were known
    copied_pairs: pd.DataFrame | None  # stats.copied.copied_class_pairs
    remedies: pd.DataFrame  # stats.remedies.remedies_frame (empty: no remedy in the grid)
    transfer: pd.DataFrame  # each teacher's train loss beside its KD transfer


def write_report(
    out_dir: str | Path,
    runs: pd.DataFrame,
    teachers: pd.DataFrame,
    analysis: Analysis,
    *,
    title: str,
    meta: dict | None = None,
    targeted: pd.DataFrame | None = None,
    regimes: pd.DataFrame | None = None,
    copied: pd.DataFrame | None = None,
    about: About | None = None,
) -> Path:
    """Write the report files into out_dir; returns the path of index.html.
    `targeted`: prompt-completion counts per run (results.targeted_counts), or None.
    `regimes`: the teacher-transfer rows of this audit and of audits set beside it (columns
    audit, teacher_training, then tables.TEACHER_TRANSFER_COLUMNS), or None for this one.
    `copied`: which teacher mistakes each condition copied (kdaudit.store.copied), or None.
    `about`: what was audited, in the config's words (the report's plain-words header)."""
    about = about or About()
    with fmt.marking(about.approximate_metrics, TOPK_MARK):  # metric names carry the mark
        return _write(Path(out_dir), runs, teachers, analysis, title, meta or {}, targeted,
                      regimes, copied, about)  # fmt: skip


def _write(out: Path, runs, teachers, analysis, title, meta, targeted, regimes, copied,
           about: About) -> Path:  # fmt: skip
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    content = _content(runs, teachers, analysis, targeted, copied)
    if regimes is not None:
        content = replace(content, transfer=regimes)
    _write_tables(out / "tables", content, analysis)
    (out / DELTA_FIGURE).write_bytes(content.deltas_png)
    (out / MATRIX_FIGURE).write_bytes(content.matrix_png)
    for axis, png in content.sweep_pngs.items():
        (out / f"figures/{SWEEPS[axis][0]}.png").write_bytes(png)
    sections = _sections(content, analysis, meta, about)
    sections[-1:-1] = _teacher_noise(out, content.teachers, analysis)  # before the notes
    notices = tuple(Notice(line) for line in intro.warnings(about, content.teachers))
    meta_line = " · ".join(f"{k}: {v}" for k, v in meta.items())
    footer = f"Generated by kdaudit {__version__}. Every headline number carries its n."
    index = out / "index.html"
    index.write_text(html.render(title, meta_line, sections, footer, notices), encoding="utf-8")
    md = markdown.render(title, meta_line, sections, footer, notices)
    (out / "report.md").write_text(md, encoding="utf-8")
    summary = summary_json(analysis, content.summary, content.counts, content.teachers, title, meta)
    (out / "summary.json").write_text(summary, encoding="utf-8")
    return index


def _content(runs, teachers, analysis: Analysis, targeted, copied) -> _Content:
    summary = summarise(runs)
    counts = tables.run_counts(runs)
    groups = tables.table_groups(summary)
    sweep = delta_sweep(analysis)
    errors = None if copied is None else copied_errors(copied)
    return _Content(
        teachers=tables.teachers_frame(teachers, runs),
        summary=summary,
        counts=counts,
        summary_tables=tuple(tables.summary_table(summary, counts, *g) for g in groups),
        deltas_png=figures.agreement_deltas(analysis),
        matrix_png=figures.asymmetry_matrix(analysis),
        sweep=sweep,
        sweep_pngs={axis: figures.delta_curves(sweep, axis) for axis in _swept(sweep)},
        equal=_equivalences(runs),
        targeted=None if targeted is None else targeted_summary(targeted),
        copied=errors,
        copied_pairs=None if errors is None else copied_class_pairs(errors),
        remedies=remedies_frame(runs, analysis),
        transfer=tables.teacher_transfer_frame(tables.teachers_frame(teachers, runs), analysis),
    )


def _equivalences(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    frames = {
        c.name: equivalence_differences(runs, c.name, c.equals, c.equals_at)
        for c in CONDITIONS.entries()
        if c.equals is not None
    }
    return {name: frame for name, frame in frames.items() if not frame.empty}


def _equal_stem(name: str) -> str:
    return f"{name}_vs_{CONDITIONS.get(name).equals}"


def _swept(sweep: pd.DataFrame) -> list[str]:
    """The grid axes with more than one value among the KD settings."""
    return [axis for axis in SWEEPS if sweep[axis].dropna().nunique() > 1]


def _write_tables(folder: Path, content: _Content, analysis: Analysis) -> None:
    raw = {
        "teachers": content.teachers,
        "summary": content.summary,
        "significance": analysis.tests_frame(),
        "verdicts": analysis.verdicts_frame(),
        "asymmetry": analysis.asymmetry_frame(),
        "asymmetry_matrix": analysis.matrix_frame(),
        "teacher_transfer": content.transfer,
    }
    if analysis.pooled:
        raw["asymmetry_matrix_pooled"] = analysis.matrix_frame(pooled=True)
    raw.update({SWEEPS[axis][0]: content.sweep for axis in content.sweep_pngs})
    raw.update({_equal_stem(name): frame for name, frame in content.equal.items()})
    if content.targeted is not None:
        raw["targeted_transfer"] = content.targeted
    if not content.remedies.empty:
        raw["remedies"] = content.remedies
    if content.copied is not None:
        raw["copied_errors"] = content.copied
        raw["copied_class_pairs"] = content.copied_pairs
    for name, frame in raw.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    formatted = {
        "teachers": [tables.teachers_table(content.teachers)],
        "summary": list(content.summary_tables),
        "significance": [tables.significance_table(analysis)],
        "verdicts": [tables.verdicts_table(analysis)],
        **{SWEEPS[a][0]: [tables.sweep_table(content.sweep, a)] for a in content.sweep_pngs},
    }
    for name, ts in formatted.items():
        (folder / f"{name}.tex").write_text(latex.tables(ts), encoding="utf-8")


def _sections(content: _Content, analysis: Analysis, meta: dict, about: About) -> list[Section]:
    facts = intro.striking_facts(analysis)
    return [
        *([intro.tested_section(about, analysis, content.teachers)] if analysis.settings else []),
        _verdict_section(analysis, content.matrix_png, about),
        *([Section("facts", "What stands out", (Bullets(tuple(facts)),))] if facts else []),
        _teachers_section(content, analysis),
        Section("summary", "Mean ± SEM per teacher seed", content.summary_tables),
        _significance_section(analysis),
        _matrix_section(analysis),
        *([_remedies_section(content.remedies)] if not content.remedies.empty else []),
        _asymmetry_section(analysis, content.deltas_png),
        *(_sweep_section(content, axis) for axis in content.sweep_pngs),
        *(_equivalence_section(name, frame) for name, frame in content.equal.items()),
        *([_targeted_section(content.targeted, analysis)] if content.targeted is not None else []),
        *([_copied_section(content)] if content.copied is not None else []),
        _notes_section(content, analysis, meta),
    ]


def _sweep_section(content: _Content, axis: str) -> Section:
    stem, title = SWEEPS[axis]
    caption = (
        f"Δcorrect and Δincorrect against {tables.AXIS_NAMES[axis]}, one panel per α; "
        "mean ± SEM over every paired (teacher seed, student seed), B chosen per setting."
    )
    figure = Figure(f"figures/{stem}.png", caption, content.sweep_pngs[axis])
    return Section(stem, title, (figure, tables.sweep_table(content.sweep, axis)))


def _targeted_section(frame: pd.DataFrame, analysis: Analysis) -> Section:
    table = tables.targeted_table(frame, analysis.options)
    note = Paragraph(
        "The teachers trained on other text than their students (protocol.teacher_data): "
        "their counts here, and every similarity metric, come from their outputs on the "
        "students' clean test text; the Teachers table gives their loss and accuracy on "
        "their own text."
    )
    return Section("targeted", "Targeted error transfer", (note, table))


def _remedies_section(frame: pd.DataFrame) -> Section:
    note = Paragraph(
        "Each remedy beside the treatment it changes, at the same setting and on the same "
        "paired seeds: its verdict and robust asymmetry label, how many of its verdict "
        "controls' matrix cells (SIDDO and RCD, raw and headroom) are negative, its accuracy "
        "against KD (Hodges-Lehmann estimate with its exact 95% interval, one-sided paired "
        "Wilcoxon p each way), and the agreement it gained over KD on the teacher's correct "
        "and incorrect test examples (below zero on the incorrect: fewer mistakes copied)."
    )
    return Section("remedies", "Remedies beside KD", (note, tables.remedies_table(frame)))


def _copied_section(content: _Content) -> Section:
    note = Paragraph(
        "The teacher's wrong test predictions that the treatment's students copied most often "
        "compared with the controls: per example, the share of each condition's runs (one per "
        "student seed) that predicted the teacher's wrong class; excess = the highest "
        "treatment rate minus the highest control rate. Then the same per class pair (true "
        "class → the teacher's wrong class), averaged over its examples. All rows: "
        "tables/copied_errors.csv, tables/copied_class_pairs.csv."
    )
    blocks = (note, tables.copied_table(content.copied, "copied_errors", COPIED_ROWS),
              tables.copied_table(content.copied_pairs, "copied_class_pairs", COPIED_ROWS))  # fmt: skip
    return Section("copied", "Which mistakes were copied", blocks)


def _equivalence_section(name: str, frame: pd.DataFrame) -> Section:
    entry = CONDITIONS.get(name)
    blocks = (Paragraph(equivalence_sentence(frame, name)), tables.equivalence_table(frame, name))
    title = f"{entry.long_name or entry.label} equals {label(entry.equals)}"
    return Section(_equal_stem(name), title, blocks)


def _teachers_section(content: _Content, analysis: Analysis) -> Section:
    blocks = (tables.teachers_table(content.teachers),
              tables.teacher_transfer_table(content.transfer))  # fmt: skip
    return Section("teachers", "Teachers", blocks)


def _verdict_section(analysis: Analysis, matrix_png: bytes, about: About) -> Section:
    if not analysis.settings:
        return Section("verdicts", "Verdicts", (Paragraph("No KD settings in the runs."),))
    settings = (*analysis.settings, *analysis.pooled)
    classes = tuple(s.verdict for s in settings)
    leads = tuple(intro.headline(s, about.incomplete) for s in settings)
    evidence = tuple(f" Evidence: {verdict_evidence(s, analysis.options)}." for s in settings)
    caption = (
        "The asymmetry matrix: Δincorrect against Δcorrect (agreement gained over each control "
        "on the teacher's wrong and right test examples) with 95% intervals, raw and on the "
        "headroom scale. Above the dashed diagonal the student gained more on the teacher's "
        "mistakes."
    )
    blocks = [
        Bullets(evidence, classes=classes, leads=leads),
        Legend(intro.LEGEND),
        tables.headline_table(analysis),
        Figure(MATRIX_FIGURE, caption, matrix_png),
        Details("Verdicts as a table", (tables.verdicts_table(analysis),)),
        intro.glossary(analysis),
    ]
    if analysis.pooled:
        blocks.append(tables.pooled_table(analysis))
    return Section("verdicts", "Verdicts", tuple(blocks))


def _matrix_section(analysis: Analysis) -> Section:
    blocks = [tables.matrix_table(analysis)]
    if analysis.pooled:
        blocks.append(tables.matrix_table(analysis, pooled=True))
    return Section("matrix", "Asymmetry against every control, raw and headroom", tuple(blocks))


def _significance_section(analysis: Analysis) -> Section:
    blocks = (
        tables.significance_table(analysis),
        Details("Exact p-values of every test", (tables.pvalues_table(analysis),)),
    )
    return Section("significance", "Significance", blocks)


def _asymmetry_section(analysis: Analysis, png: bytes) -> Section:
    caption = (
        "Agreement gained over the baseline control B on teacher-correct (Δcorrect) and "
        "teacher-incorrect (Δincorrect) test examples; mean ± SEM over paired student seeds. "
        "B=X/Y: X was the baseline for Δcorrect, Y for Δincorrect."
    )
    blocks = (Figure(DELTA_FIGURE, caption, png), tables.deltas_table(analysis))
    return Section("asymmetry", "Agreement deltas: what was transferred", blocks)


def _notes_section(content: _Content, analysis: Analysis, meta: dict) -> Section:
    failed = [f"{k}: {v}" for k, v in meta.items() if "fail" in str(k).lower()]
    setting_notes = [
        f"Teacher seed {s.teacher_seed}, {fmt.control_name(s.condition)} "
        f"{fmt.setting_of(s)}: {s.note}"
        for s in analysis.settings
        if s.note
    ]
    blocks: list = [tables.runs_table(content.counts)]
    if failed:
        blocks += [Paragraph("Failed runs:"), Bullets(tuple(failed))]
    if setting_notes:
        blocks += [Paragraph("Per-setting notes:"), Bullets(tuple(setting_notes))]
    treatments = {s.condition for s in analysis.settings}
    notes = protocol_notes(analysis.options, treatments)
    blocks += [Paragraph("Protocol decisions:"), Bullets(tuple(notes))]
    return Section("notes", "Notes", tuple(blocks))


def _teacher_noise(out: Path, teachers: pd.DataFrame, analysis: Analysis) -> list[Section]:
    """The teacher-error sweep (protocol.teacher_label_noise) when it has more than one rate:
    tables/teacher_noise.csv, figures/teacher_noise.png and their section."""
    frame = tables.teacher_noise_frame(teachers, analysis)
    if frame["teacher_label_noise"].nunique() < 2:
        return []
    frame.to_csv(out / "tables" / "teacher_noise.csv", index=False)
    png = figures.teacher_noise(frame)
    (out / "figures" / "teacher_noise.png").write_bytes(png)
    caption = (
        "Against the teacher's label-noise rate (pooled over teacher seeds when there are "
        "several): the transfer, KD's gain in top-1 agreement with its teacher over SIDDO "
        "(Hodges-Lehmann, exact 95% interval), and Δcorrect (solid) / Δincorrect (dashed) "
        "against SIDDO on both scales (mean, 95% interval)."
    )
    blocks = (Figure("figures/teacher_noise.png", caption, png), tables.teacher_noise_table(frame))
    return [Section("teacher_noise", "Teacher-error sweep: transfer against teacher label noise",
                    blocks)]  # fmt: skip
