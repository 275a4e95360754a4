"""The report's first screen for a reader who has not read the paper: what was tested, one
plain sentence per verdict, the facts that stand out, a legend and a glossary.

Every fact is computed from the analysis; a fact that compares two conditions is stated
only where its paired interval excludes zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kdaudit.conditions import CONDITIONS, condition
from kdaudit.report import fmt
from kdaudit.report.blocks import Bullets, Details, Paragraph, Section
from kdaudit.stats import POOLED, Analysis, SettingResult

CHANCE_MARGIN = 0.05  # a teacher within 5 points of chance (1/K) is near chance
MAX_FACTS = 3
ACCURACY = "accuracy"

TRANSFER_PLAIN = {
    "supported": "the student learned from the teacher: it is more similar to the teacher "
    "than both controls are (transfer supported)",
    "marginal": "the student became slightly more similar to the teacher than the controls "
    "(transfer marginal: significant, but a small gain)",
    "not_supported": "no evidence that the student learned more from the teacher than the "
    "controls did (transfer not supported)",
    "insufficient_n": "no verdict: too few paired seeds for any test to reach significance",
}
ASYMMETRY_PLAIN = {
    "negative": "it copied the teacher's mistakes more than its correct answers, against "
    "every control and on both scales",
    "positive": "it gained more agreement on the teacher's correct answers than on its mistakes",
    "symmetric": "it picked up the teacher's mistakes and correct answers about equally",
    "baseline-dependent": "whether it copied the teacher's mistakes more than its correct "
    "answers depends on the control and the scale (see the evidence)",
    "undetermined": "whether mistakes or correct answers transferred more cannot be told at this n",
}
LEGEND = (
    ("supported", "transfer supported"),
    ("marginal", "transfer marginal"),
    ("not_supported", "transfer not supported"),
    ("insufficient_n", "too few seeds for a verdict"),
)


@dataclass(frozen=True)
class About:
    """What was audited, from its config; None where the source does not say (compare)."""

    dataset: str | None = None
    teacher_model: str | None = None
    student_model: str | None = None  # None: the teacher's architecture (self-distillation)
    num_classes: int | None = None
    runs_complete: int | None = None
    runs_total: int | None = None
    pretrained_teacher: bool = False
    approximate_metrics: tuple[str, ...] = ()  # computed from top-k inputs: marked as such
    smoke: bool = False  # a smoke run (kdaudit run --smoke): a check of the config, no evidence
    trained_here: bool = True  # False: models trained elsewhere (compare), their setup unknown

    @property
    def incomplete(self) -> bool:
        return self.runs_total is not None and (self.runs_complete or 0) < self.runs_total


def warnings(about: About, teachers: pd.DataFrame) -> list[str]:
    """Lines the reader must see before any verdict: an incomplete grid, a teacher near
    chance."""
    lines = []
    if about.smoke:
        lines.append(
            "Smoke run: a tiny grid and a few training steps, to check that the config works. "
            "Its verdicts are not evidence; run without --smoke for the audit."
        )
    if about.incomplete:
        lines.append(
            f"Incomplete grid: {about.runs_complete} of {about.runs_total} runs complete. "
            "The verdicts below use only the complete runs and may change; rerun the same "
            "`kdaudit run` command to finish the grid."
        )
    for seed, acc in _near_chance(about, teachers):
        lines.append(
            f"Teacher seed {seed} is near chance: test accuracy {fmt.num(acc, 3)} against "
            f"{fmt.num(1 / about.num_classes, 3)} for {about.num_classes} classes. Its "
            "'mistakes' are mostly noise, so the asymmetry verdicts say little; train the "
            "teacher longer (train.epochs) or check its data."
        )
    return lines


def _near_chance(about: About, teachers: pd.DataFrame) -> list[tuple[int, float]]:
    if not about.num_classes or teachers.empty or "test_accuracy" not in teachers:
        return []
    chance = 1.0 / about.num_classes
    rows = teachers.dropna(subset=["test_accuracy"])
    return [(int(r.teacher_seed), float(r.test_accuracy)) for r in rows.itertuples()
            if r.test_accuracy < chance + CHANCE_MARGIN]  # fmt: skip


def tested_section(about: About, analysis: Analysis, teachers: pd.DataFrame) -> Section:
    """'What was tested', in plain words."""
    blocks = [Paragraph(_setup(about, analysis, teachers))]
    controls = _controls(analysis)
    if controls:
        blocks.append(Paragraph("Each student is compared, seed by seed, with controls trained "
                                "on exactly the same minibatches:"))  # fmt: skip
        blocks.append(Bullets(tuple(_plain(c) for c in controls),
                              leads=tuple(_name(c) for c in controls)))  # fmt: skip
    blocks.append(Paragraph(
        "Two questions: did the student become more similar to the teacher than the controls "
        "(transfer)? And did the agreement it gained fall more on the teacher's mistakes "
        "than on its correct answers (negative asymmetry: the mistakes were copied)?"
    ))  # fmt: skip
    return Section("tested", "What was tested", tuple(blocks))


def _setup(about: About, analysis: Analysis, teachers: pd.DataFrame) -> str:
    seeds = sorted(teachers["teacher_seed"].unique()) if not teachers.empty else []
    rates = _noise_rates(teachers)
    model = f"{about.teacher_model}, " if about.teacher_model else ""
    seeds_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    if rates:  # a teacher-error sweep: one teacher per (seed, rate)
        seeds_text += (f"; one per rate of training labels replaced at random: "
                       f"{', '.join(f'{r:g}' for r in rates)}")  # fmt: skip
    count = len(teachers) if rates else len(seeds)
    teacher = ("A pretrained teacher" if about.pretrained_teacher
               else f"{_count(count, 'teacher')} ({model}{seeds_text})")  # fmt: skip
    data = f" on {about.dataset}" if about.dataset else ""
    accuracy = _teacher_accuracy(teachers, about)
    students = ("students of the same architecture, starting from the teacher's own initial "
                "weights (self-distillation)") if about.student_model is None else (
                f"students of another architecture ({about.student_model})")  # fmt: skip
    if not about.trained_here:
        students = "students trained outside kdaudit (their saved test logits are compared)"
    treatments = sorted({s.condition for s in analysis.settings}, key=_order)
    how = " and ".join(f"{_name(t)} ({condition(t).plain})" if condition(t).plain else _name(t)
                       for t in treatments)  # fmt: skip
    n = max((s.n for s in analysis.settings), default=0)
    trained = f", trained{data}{accuracy}," if data or accuracy else ""
    verb = "were" if count > 1 else "was"
    return (f"{teacher}{trained} {verb} distilled into {students}, by {how}, at "
            f"{_settings(analysis)}, with up to {n} paired student seeds per setting.")  # fmt: skip


def _noise_rates(teachers: pd.DataFrame) -> list[float]:
    """The teacher-error sweep's label-noise rates, when there is more than one."""
    if "teacher_label_noise" not in teachers:
        return []
    rates = sorted(teachers["teacher_label_noise"].fillna(0.0).unique())
    return rates if len(rates) > 1 else []


def _teacher_accuracy(teachers: pd.DataFrame, about: About) -> str:
    if teachers.empty or "test_accuracy" not in teachers:
        return ""
    acc = teachers["test_accuracy"].dropna()
    if acc.empty:
        return ""
    chance = f" (chance: {fmt.num(1 / about.num_classes, 2)})" if about.num_classes else ""
    span = fmt.num(acc.iloc[0], 3) if len(acc) == 1 else \
        f"{fmt.num(acc.min(), 3)} to {fmt.num(acc.max(), 3)}"  # fmt: skip
    return f" to test accuracy {span}{chance}"


def _settings(analysis: Analysis) -> str:
    alphas = sorted({s.alpha for s in analysis.settings if not fmt.is_missing(s.alpha)})
    temps = sorted({s.temperature for s in analysis.settings
                    if not fmt.is_missing(s.temperature)})  # fmt: skip
    parts = [f"α = {', '.join(f'{a:g}' for a in alphas)}"] if alphas else []
    if temps:
        parts.append(f"T = {', '.join(f'{t:g}' for t in temps)}")
    return " and ".join(parts) or "its settings"


def _controls(analysis: Analysis) -> list[str]:
    present = {c.control for s in analysis.settings for c in s.comparisons}
    return sorted(present, key=_order)


def _order(name: str) -> int:
    return condition(name).order if name in CONDITIONS else 1000


def _name(name: str) -> str:
    entry = condition(name) if name in CONDITIONS else None
    if entry is None or not entry.long_name or entry.long_name == entry.label:
        return fmt.control_name(name)
    return f"{entry.label} ({entry.long_name.lower()})"


def _plain(name: str) -> str:
    entry = condition(name) if name in CONDITIONS else None
    return f": {entry.plain}." if entry is not None and entry.plain else "."


def _count(n: int, noun: str) -> str:
    return f"One {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------- verdicts in plain words


def headline(s: SettingResult, incomplete: bool = False) -> str:
    """'KD alpha=0.9, T=1: the student learned from the teacher ..., and it copied ...'"""
    setting = fmt.setting_of(s)
    who = "teacher seeds pooled" if s.teacher_seed == POOLED else f"teacher seed {s.teacher_seed}"
    text = f"{fmt.control_name(s.condition)} {setting} ({who}): {TRANSFER_PLAIN[s.verdict]}"
    if s.transfer_found:
        text += f"; {ASYMMETRY_PLAIN.get(s.asymmetry, s.asymmetry)}"
    text += "."
    return f"(Incomplete grid) {text}" if incomplete else text


# ---------------------------------------------------------------- what stands out


def striking_facts(analysis: Analysis) -> list[str]:
    """At most MAX_FACTS sentences, the strongest first: a control more accurate than the
    treatment (paired interval below zero), a verdict that differs between teacher seeds,
    and a paper's label that another control or scale contradicts."""
    facts = _more_accurate_controls(analysis)
    facts += _seed_dependent(analysis)
    facts += _label_contradicted(analysis)
    return facts[:MAX_FACTS]


def _more_accurate_controls(analysis: Analysis) -> list[str]:
    found = []
    for s in analysis.settings:
        for c in s.comparisons:
            t = c.test(ACCURACY)
            if t is None or fmt.is_missing(t.ci_high) or not t.ci_high < 0:
                continue
            gap = t.mean_control - t.mean_treatment
            found.append((gap, s, c.control, t))
    found.sort(key=lambda x: -x[0])
    return [
        f"The {fmt.control_name(control)} students are {100 * gap:.1f} points more accurate "
        f"than the {fmt.control_name(s.condition)} students at "
        f"{fmt.setting_of(s)} (teacher seed {s.teacher_seed}: "
        f"test accuracy {fmt.num(t.mean_control, 3)} against {fmt.num(t.mean_treatment, 3)}, "
        f"n={t.n} paired seeds, {fmt.control_name(s.condition)} − "
        f"{fmt.control_name(control)} {fmt.signed(t.estimate)} "
        f"{fmt.interval(t.ci_low, t.ci_high)}): "
        f"{_why_more_accurate(control)}"
        for gap, s, control, t in found[:1]
    ]


def _why_more_accurate(control: str) -> str:
    entry = condition(control) if control in CONDITIONS else None
    if entry is not None and entry.params:  # a loss-shaped control (RCD, LS): regularisation
        return "here the regularisation alone, without the teacher, did better than distillation."
    return "here distillation cost accuracy."


def _seed_dependent(analysis: Analysis) -> list[str]:
    facts = []
    for s in analysis.pooled:
        verdicts = {v: n for v, n in (s.teacher_verdicts or {}).items() if n}
        if len(verdicts) > 1:
            counts = ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in verdicts.items())
            facts.append(
                f"{fmt.control_name(s.condition)} "
                f"{fmt.setting_of(s)}: the verdict differs "
                f"between teacher seeds ({counts}); it hangs on which teacher was trained, "
                "so read the per-teacher rows, not only the pooled one."
            )
    return facts


def _label_contradicted(analysis: Analysis) -> list[str]:
    facts = []
    for s in sorted(
        analysis.settings, key=lambda s: (s.verdict != "supported", not s.transfer_found)
    ):
        paper = s.paper_asymmetry.label
        if s.asymmetry != "baseline-dependent" or paper not in ("negative", "positive"):
            continue
        facts.append(
            f"The paper's single-baseline rule calls {fmt.control_name(s.condition)} "
            f"{fmt.setting_of(s)} (teacher seed "
            f"{s.teacher_seed}) {paper}, but the comparisons disagree: {s.asymmetry_why}. "
            "The label depends on which control and which scale one trusts."
        )
    return facts[:1]


# ---------------------------------------------------------------- glossary


def glossary(analysis: Analysis) -> Details:
    """Every term the report uses, the conditions present first."""
    present = {s.condition for s in analysis.settings} | set(_controls(analysis))
    names = sorted(present, key=_order)
    terms = [(_name(n), condition(n).plain) for n in names
             if n in CONDITIONS and condition(n).plain]  # fmt: skip
    terms += list(TERMS)
    return Details("Glossary: every term used here", (Bullets(tuple(f": {d}" for _, d in terms),
                                        leads=tuple(t for t, _ in terms)),))  # fmt: skip


TERMS = (
    ("α (alpha)", "the weight of the teacher's term in the student's loss (0: labels only)."),
    ("T (temperature)", "softens both output distributions before they are compared."),
    (
        "paired seeds",
        "each student seed fixes the order of the data; every condition of one "
        "seed sees the same minibatches, so conditions are compared seed by seed.",
    ),
    ("agreement", "the share of test examples on which two models predict the same class."),
    (
        "teacher-correct / teacher-incorrect examples",
        "the test examples the teacher gets "
        "right / wrong; agreement on the incorrect ones means repeating the teacher's mistake.",
    ),
    (
        "Δcorrect, Δincorrect",
        "agreement gained over a control on the teacher-correct / teacher-incorrect examples.",
    ),
    (
        "raw and headroom scales",
        "raw: the difference in agreement; headroom: that difference "
        "divided by the control's remaining disagreement (1 − its agreement), the share of the "
        "possible gain achieved.",
    ),
    (
        "transfer",
        "supported when most functional similarity metrics are significantly "
        "better than every verdict control; marginal when supported but the median gain over "
        "SIDDO is small; insufficient n when no test could reach significance at this n.",
    ),
    (
        "functional similarity metrics",
        "activation distance (L2 between output "
        "distributions), JS divergence, rank disagreement (share of class ranks that differ) "
        "and prediction disagreement (share of top-1 classes that differ), teacher against "
        "student on the test set.",
    ),
    (
        "asymmetry",
        "negative: more agreement gained on the teacher's mistakes than on its "
        "correct answers; positive: the reverse; symmetric: equal within the tolerance; "
        "baseline-dependent: controls or scales disagree; undetermined: neither test nor "
        "interval decides.",
    ),
    (
        "the paper's label",
        "the asymmetry as the original paper computes it: raw scale, one baseline control.",
    ),
    (
        "p, FDR",
        "one-sided Wilcoxon signed-rank p-values over paired seeds, corrected for the "
        "four functional metrics by the false discovery rate.",
    ),
    (
        "effect size",
        "the rank-biserial correlation of the paired differences (+1: the "
        "treatment better on every seed).",
    ),
    (
        "estimate [interval]",
        "the Hodges-Lehmann estimate of treatment − control with its exact 95% interval.",
    ),
)
