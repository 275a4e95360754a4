"""The answer of an audit, whichever way it was made (`kdaudit.audit`, `kdaudit.api.run`,
`report` of a run directory, or `compare` of saved logits)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdaudit.report.intro import headline, striking_facts
from kdaudit.report.text import verdict_evidence, verdict_lines
from kdaudit.stats import Analysis


@dataclass(frozen=True)
class AuditResult:
    out: Path
    runs: pd.DataFrame  # tidy: one row per student run per metric
    teachers: pd.DataFrame  # one row per teacher (train columns NaN when unknown)
    analysis: Analysis | None  # None: no complete student run yet
    report: Path | None  # index.html (None with no analysis)
    outcome: Any = None  # kdaudit.executors.GridOutcome of the call that trained (run, audit)
    notes: tuple[str, ...] = ()  # warnings and limits, also in the report's header

    @property
    def verdicts(self) -> pd.DataFrame:
        return self.analysis.verdicts_frame() if self.analysis else pd.DataFrame()

    def verdict_lines(self) -> list[str]:
        return verdict_lines(self.analysis) if self.analysis else []

    def plain_verdicts(self) -> list[tuple[str, str]]:
        """Per setting (then pooled): its verdict in plain words, and the evidence behind it."""
        if not self.analysis:
            return []
        settings = (*self.analysis.settings, *self.analysis.pooled)
        return [(headline(s), verdict_evidence(s, self.analysis.options)) for s in settings]

    def facts(self) -> list[str]:
        """The facts that stand out, as the report states them."""
        return striking_facts(self.analysis) if self.analysis else []
