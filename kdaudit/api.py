"""The Python API behind the CLI: run an audit, and turn a run directory into its answer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from kdaudit.config import ExperimentConfig, load_config
from kdaudit.executors import ExecutorConfig, GridOutcome, grid_status, run_grid
from kdaudit.progress import Reporter
from kdaudit.protocol import expand, smoke
from kdaudit.report import verdict_lines, write_report
from kdaudit.results import load_runs, load_teachers
from kdaudit.stats import Analysis, analyse
from kdaudit.store import RunStore, code_version


@dataclass(frozen=True)
class AuditResult:
    out: Path
    runs: pd.DataFrame  # tidy: one row per student run per metric
    teachers: pd.DataFrame  # one row per teacher
    analysis: Analysis
    report: Path  # index.html

    @property
    def verdicts(self) -> pd.DataFrame:
        return self.analysis.verdicts_frame()

    def verdict_lines(self) -> list[str]:
        return verdict_lines(self.analysis)


def run(
    config: str | Path | ExperimentConfig,
    out: str | Path | None = None,
    *,
    overrides: list[str] = (),
    device: str = "auto",
    data_dir: str | Path | None = None,
    smoke_test: bool = False,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
    executor: ExecutorConfig | str = "local",
) -> tuple[GridOutcome, AuditResult | None]:
    """Run (or resume) the audit a config describes, then write its report.
    `executor`: "local", "ray", or an ExecutorConfig (workers, threads, address, retries)."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if smoke_test:
        cfg = smoke(cfg)
    out = Path(out) if out else Path("runs") / cfg.name
    data_dir = data_dir or cfg.data_dir
    outcome = run_grid(cfg, out, executor, device, data_dir, retry_failed, reporter)
    has_students = any(RunStore(out).is_complete(s.run_id) for s in expand(cfg).students)
    return outcome, (report(out) if has_students else None)


def report(out: str | Path) -> AuditResult:
    """Analyse the complete runs stored in `out` and write `out/report/`."""
    out = Path(out)
    cfg = RunStore(out).load_experiment()
    grid = expand(cfg)
    runs, teachers = load_runs(out, grid), load_teachers(out, grid)
    if runs.empty:
        raise RuntimeError(f"{out} holds no complete student run yet; run `kdaudit run` first")
    analysis = analyse(runs, cfg.analysis)
    path = write_report(out / "report", runs, teachers, analysis, title=f"kdaudit: {cfg.name}",
                        meta=_meta(out, cfg))  # fmt: skip
    return AuditResult(out, runs, teachers, analysis, path)


def _meta(out: Path, cfg: ExperimentConfig) -> dict:
    status = grid_status(out)
    meta = {
        "config": cfg.name,
        "runs": f"{status['complete']} complete of {status['total']}",
        **code_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if status["failed"]:
        meta["failed runs"] = "; ".join(
            f"{f['run_id']}: {f['error']}" for f in status["failed_runs"]
        )
    return meta


def compare(manifest: str | Path, out: str | Path | None = None, **options):
    """Audit saved test logits listed in a manifest CSV; see kdaudit.compare.compare."""
    from kdaudit.compare import compare as compare_logits

    return compare_logits(manifest, out, **options)
