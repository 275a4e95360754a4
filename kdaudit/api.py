"""The Python API behind the CLI: run an audit, and turn a run directory into its answer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from kdaudit.config import ConfigError, ExperimentConfig, load_config, to_dict
from kdaudit.executors import ExecutorConfig, GridOutcome, grid_status, run_grid
from kdaudit.progress import Reporter
from kdaudit.protocol import expand, smoke
from kdaudit.report import verdict_lines, write_report
from kdaudit.results import load_runs, load_teachers, targeted_transfer
from kdaudit.stats import Analysis, analyse
from kdaudit.store import RunStore, code_version


@dataclass(frozen=True)
class AuditResult:
    out: Path
    runs: pd.DataFrame  # tidy: one row per student run per metric
    teachers: pd.DataFrame  # one row per teacher
    analysis: Analysis
    report: Path  # index.html
    outcome: GridOutcome | None = None  # what the call that made it ran (audit() only)

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
    cfg = _pin_teacher(cfg)
    _check_user_code(cfg, executor, data_dir)
    outcome = run_grid(cfg, out, executor, device, data_dir, retry_failed, reporter)
    has_students = any(RunStore(out).is_complete(s.run_id) for s in expand(cfg).students)
    return outcome, (report(out, data_dir) if has_students else None)


def audit(
    model: Callable[[int], Any],
    train: Any,
    test: Any,
    *,
    teacher: Any = None,
    out: str | Path | None = None,
    alphas: Iterable[float] | None = None,
    temperatures: Iterable[float] | None = None,
    teacher_seeds: Iterable[int] | None = None,
    student_seeds: Iterable[int] | None = None,
    conditions: Iterable[str] | None = None,
    num_classes: int | None = None,
    name: str = "audit",
    device: str = "auto",
    executor: ExecutorConfig | str = "local",
    analysis: Any = None,
    save_weights: bool = False,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
    **training: Any,
) -> AuditResult:
    """Audit your own distillation: the protocol of `run`, on your models and data.

    model: a factory, seed (int) -> a new nn.Module mapping inputs (B, ...) to logits (B, K);
        the students' model, and the teachers' too when `teacher` is None. kdaudit seeds
        torch's RNG with the seed before calling it.
    teacher: None (teachers trained from `model`: self-distillation), a factory (teachers
        trained from it), or a trained nn.Module (a pretrained teacher: one teacher, whose
        students start from their own initialisation per student seed).
    train, test: map-style Datasets of (input, label) pairs, or pairs of tensors (x, y).
    alphas, temperatures, teacher_seeds, student_seeds, conditions: the grid (None: the
        protocol's defaults; one teacher seed with a pretrained teacher).
    **training: kdaudit.config.TrainConfig fields (optimizer, lr, epochs, batch_size, ...).
    executor: the local executor without workers (the objects live in this process); an
        ExecutorConfig sets its `threads`.

    Runs are stored in `out` (default runs/<name>); the same call again resumes.
    """
    from kdaudit.objects import experiment_from_objects
    from kdaudit.runner import check_models

    options = _in_process(executor)
    out = Path(out) if out else Path("runs") / name
    grid_keys = {"alphas": alphas, "temperatures": temperatures, "teacher_seeds": teacher_seeds,
                 "student_seeds": student_seeds, "conditions": conditions}  # fmt: skip
    cfg, data = experiment_from_objects(
        model, train, test, teacher=teacher, out=out, name=name, num_classes=num_classes,
        protocol={k: _as_list(v) for k, v in grid_keys.items() if v is not None}, training=training,
        analysis=analysis, save_weights=save_weights,
    )  # fmt: skip
    check_models(expand(cfg), data)
    outcome = run_grid(cfg, out, options, device, None, retry_failed, reporter)
    _check_outcome(out, cfg, outcome)
    return replace(report(out), outcome=outcome)


def _as_list(value: Any) -> Any:
    # ranges, generators and arrays of seeds or alphas, as the config's lists; one value stays
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value


def _in_process(executor: ExecutorConfig | str) -> ExecutorConfig:
    options = ExecutorConfig(executor) if isinstance(executor, str) else executor
    if options.name != "local" or (options.workers or 1) > 1:
        raise ConfigError(
            "audit(): models and data passed as Python objects exist only in this process, "
            "so they run with the local executor without workers; for worker processes or "
            "Ray, name them in a config (model: {factory: 'package.module:function'}, the "
            "same for data) and use `kdaudit run CONFIG --workers N` or `--executor ray`"
        )
    return options


def _check_outcome(out: Path, cfg: ExperimentConfig, outcome: GridOutcome) -> None:
    """Raise when nothing can be reported (a teacher or every student failed); warn when
    some runs failed (the report leaves them out and shows the reduced n)."""
    if not outcome.failed:
        return
    store, grid = RunStore(out), expand(cfg)
    first = store.failure(outcome.failed[0]) or {}
    detail = f"{outcome.failed[0]}: {first.get('error', '?')}"
    if any(store.failure(t.run_id) for t in grid.teachers) or not any(
        store.is_complete(s.run_id) for s in grid.students
    ):
        raise RuntimeError(f"audit(): {len(outcome.failed)} runs failed, first {detail}; "
                           "fix the cause and call again (retry_failed=True reruns them)")  # fmt: skip
    warnings.warn(f"audit(): {len(outcome.failed)} of {outcome.total} runs failed ({detail}); "
                  "the report leaves them out", stacklevel=3)  # fmt: skip


def _pin_teacher(cfg: ExperimentConfig) -> ExperimentConfig:
    """Record a pretrained teacher's absolute path and sha256 in the config (saved in
    experiment.yaml): run ids follow the weights, and the report needs no file."""
    from kdaudit.models.checkpoint import file_sha256

    path = cfg.protocol.teacher_checkpoint
    if path is None:
        return cfg
    if not Path(path).is_file():
        raise ConfigError(f"protocol.teacher_checkpoint: no file at {path}")
    sha256 = file_sha256(path)
    pinned = cfg.protocol.teacher_sha256
    if pinned and pinned != sha256:
        raise ConfigError(f"protocol.teacher_sha256: {path} has sha256 {sha256}, the config "
                          f"pins {pinned}; restore the file or remove the pin")  # fmt: skip
    protocol = replace(cfg.protocol, teacher_checkpoint=str(Path(path).resolve()),
                       teacher_sha256=sha256)  # fmt: skip
    return replace(cfg, protocol=protocol)


def _check_user_code(cfg: ExperimentConfig, executor, data_dir) -> None:
    """User code and checkpoints fail here, once, with their own message, rather than in
    every run: import every named factory; on the local executor, also build the models
    (and load the checkpoint) on the data."""
    from kdaudit.data import load_data
    from kdaudit.runner import check_models
    from kdaudit.user_code import import_callable

    sections = {"data": cfg.data, "model": cfg.model,
                "protocol.student_model": cfg.protocol.student_model,
                "protocol.teacher_data": getattr(cfg.protocol, "teacher_data", None)}  # fmt: skip
    named = {k: s for k, s in sections.items() if getattr(s, "name", None) == "factory"}
    for key, section in named.items():
        import_callable(section.factory, f"{key}.factory")
    local = executor == "local" or getattr(executor, "name", None) == "local"
    if (named or cfg.pretrained_teacher) and local:
        # the same cache key as the executor's load: this process loads the data once
        data = load_data(cfg.data, Path(data_dir).resolve() if data_dir else None)
        check_models(expand(cfg), data)


def report(
    out: str | Path, data_dir: str | Path | None = None, beside: Iterable[str | Path] = ()
) -> AuditResult:
    """Analyse the complete runs stored in `out` and write `out/report/`. `data_dir` is read
    only by grids whose report needs the test data (targeted error transfer). `beside`: run
    directories of other audits (say, the same grid with a RandAugment teacher) whose
    teachers' train loss and KD transfer the report's teacher table sets beside this one's."""
    out = Path(out)
    cfg, runs, teachers, analysis = _analysed(out)
    targeted = targeted_transfer(out, cfg, expand(cfg), data_dir)
    regimes = _regimes([out, *beside]) if beside else None
    path = write_report(out / "report", runs, teachers, analysis, title=f"kdaudit: {cfg.name}",
                        meta=_meta(out, cfg), targeted=targeted, regimes=regimes)  # fmt: skip
    return AuditResult(out, runs, teachers, analysis, path)


def _analysed(out: Path):
    cfg = RunStore(out).load_experiment()
    grid = expand(cfg)
    runs, teachers = load_runs(out, grid), load_teachers(out, grid)
    if runs.empty:
        raise RuntimeError(f"{out} holds no complete student run yet; run `kdaudit run` first")
    return cfg, runs, teachers, analyse(runs, cfg.analysis)


def _regimes(dirs: list) -> pd.DataFrame:
    """The teacher-transfer rows of each audit, labelled by its name and by how its
    teachers were trained (the training keys in which they differ from the students)."""
    from kdaudit.report.tables import teacher_transfer_frame, teachers_frame

    frames = []
    for d in dirs:
        cfg, runs, teachers, analysis = _analysed(Path(d))
        frame = teacher_transfer_frame(teachers_frame(teachers, runs), analysis)
        frame.insert(0, "teacher_training", _teacher_training(cfg))
        frame.insert(0, "audit", cfg.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _teacher_training(cfg: ExperimentConfig) -> str:
    teacher = cfg.protocol.teacher_train
    if teacher is None or teacher == cfg.train:
        return "as the students"
    differ = {k: v for k, v in to_dict(teacher).items() if v != to_dict(cfg.train)[k]}
    return ", ".join(f"{k}={v}" for k, v in differ.items())


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
    if cfg.pretrained_teacher:
        p = cfg.protocol
        meta["teacher"] = (
            f"pretrained ({Path(p.teacher_checkpoint).name}, sha256 {(p.teacher_sha256 or '?')[:12]}); "
            "students share their own initialisation per student seed, not the teacher's"
        )
    return meta


def compare(manifest: str | Path, out: str | Path | None = None, **options):
    """Audit saved test logits listed in a manifest CSV; see kdaudit.compare.compare."""
    from kdaudit.compare import compare as compare_logits

    return compare_logits(manifest, out, **options)
