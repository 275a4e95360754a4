"""The Python API, and all the CLI calls: run an audit, report, status, compare, and
`audit()` of your own models and data.

Importing it is light (configs and the condition registry); training, statistics and the
report are loaded by the call that needs them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdaudit.config import (
    AnalysisOptions,
    ConfigError,
    ExperimentConfig,
    ProtocolConfig,
    TrainConfig,
    load_config,
    to_dict,
)
from kdaudit.protocol import expand, is_smoke, smoke

__all__ = ["AuditOptions", "audit", "compare", "logits", "plan", "report", "run", "status"]


def run(
    config: str | Path | ExperimentConfig,
    out: str | Path | None = None,
    *,
    overrides: list[str] = (),
    device: str = "auto",
    data_dir: str | Path | None = None,
    smoke_test: bool = False,
    retry_failed: bool = False,
    reporter=None,  # kdaudit.executors.progress.Reporter
    executor="local",  # "local", "ray", or a kdaudit.executors.ExecutorConfig
    force_new_config: bool = False,
):
    """Run (or resume) the audit a config describes, then write its report. Returns an
    AuditResult whose `outcome` says what this call ran; its analysis and report are None
    while no student run is complete. A config other than the one whose runs `out` holds
    is refused (ConfigError) unless `force_new_config`."""
    from kdaudit.executors import run_grid
    from kdaudit.store import RunStore
    from kdaudit.store.target import check_same_config, check_writable

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if smoke_test:
        cfg = smoke(cfg)
    out = Path(out) if out else Path("runs") / cfg.name
    data_dir = data_dir or cfg.data_dir
    cfg = _pin_teacher(cfg)
    check_writable(out)
    if not force_new_config:
        check_same_config(out, cfg, config)
    _check_user_code(cfg, executor, data_dir)
    outcome = run_grid(cfg, out, executor, device, data_dir, retry_failed, reporter)
    if not any(RunStore(out).is_complete(s.run_id) for s in expand(cfg).students):
        return _unanalysed(out, outcome)
    return replace(report(out, data_dir), outcome=outcome)


def _unanalysed(out: Path, outcome):
    import pandas as pd

    from kdaudit.report.result import AuditResult

    return AuditResult(out, pd.DataFrame(), pd.DataFrame(), None, None, outcome)


@dataclass(frozen=True)
class AuditOptions:
    """How `audit()` runs (none of it changes a run's result)."""

    device: str = "auto"
    executor: Any = "local"  # the local executor without workers; an ExecutorConfig for threads
    save_weights: bool = False
    retry_failed: bool = False
    reporter: Any = None  # kdaudit.executors.progress.Reporter
    force_new_config: bool = False  # run into an `out` holding another config's runs


def audit(
    model: Callable[[int], Any],
    train: Any,
    test: Any,
    *,
    teacher: Any = None,
    out: str | Path | None = None,
    name: str = "audit",
    num_classes: int | None = None,
    protocol: ProtocolConfig | None = None,
    training: TrainConfig | None = None,
    analysis: AnalysisOptions | None = None,
    options: AuditOptions | None = None,
    **keywords: Any,
):
    """Audit your own distillation: the protocol of `run`, on your models and data.

    model: a factory, seed (int) -> a new nn.Module mapping inputs (B, ...) to logits (B, K);
        the students' model, and the teachers' too when `teacher` is None. kdaudit seeds
        torch's RNG with the seed before calling it.
    teacher: None (teachers trained from `model`: self-distillation), a factory (teachers
        trained from it), or a trained nn.Module (a pretrained teacher: one teacher, whose
        students start from their own initialisation per student seed).
    train, test: map-style Datasets of (input, label) pairs, or pairs of tensors (x, y).
    protocol, training, analysis, options: typed configs (kdaudit.config.ProtocolConfig,
        TrainConfig, AnalysisOptions; AuditOptions); None: the defaults (one teacher seed with
        a pretrained teacher).
    **keywords: the common case without config objects: any field of those four by name,
        e.g. alphas=(0.5,), student_seeds=range(10, 15), conditions=["siddo", "rcd",
        {"factory": "mypkg.losses:reverse_kl", "name": "rkd"}], epochs=5, device="cpu".
        A keyword overrides the same field of an object passed.

    Runs are stored in `out` (default runs/<name>); the same call again resumes.
    """
    from kdaudit.api.objects import experiment_from_objects, save_pretrained_teacher
    from kdaudit.engine.run import check_models
    from kdaudit.executors import run_grid
    from kdaudit.store.target import check_same_config, check_writable

    parts = _split_keywords(keywords, protocol, training, options)
    run_options = replace(options or AuditOptions(), **parts["options"])
    executor = _in_process(run_options.executor)
    out = Path(out) if out else Path("runs") / name
    check_writable(out)
    cfg, data = experiment_from_objects(
        model, train, test, teacher=teacher, out=out, name=name, num_classes=num_classes,
        protocol=parts["protocol"], training=parts["training"], analysis=analysis,
        save_weights=run_options.save_weights,
    )  # fmt: skip
    if not run_options.force_new_config:
        check_same_config(out, cfg, "this audit() call", ("out", "force_new_config=True"))
    created = save_pretrained_teacher(cfg, teacher)
    try:
        check_models(expand(cfg), data)  # loads the teacher's checkpoint
    except Exception:
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    outcome = run_grid(cfg, out, executor, run_options.device, None, run_options.retry_failed,
                       run_options.reporter)  # fmt: skip
    _check_outcome(out, cfg, outcome)
    return replace(report(out), outcome=outcome)


def _split_keywords(keywords: dict, protocol, training, options) -> dict[str, dict]:
    """The simple keyword form, sorted into the config each keyword belongs to: protocol and
    training as config sections (an object's fields, the keywords over them), options as
    the AuditOptions fields to replace."""
    owners = {"protocol": (ProtocolConfig, protocol), "training": (TrainConfig, training),
              "options": (AuditOptions, None)}  # fmt: skip
    parts = {}
    for part, (cls, given) in owners.items():
        names = {f.name for f in fields(cls)}
        base = to_dict(given, drop_defaults=True) if given is not None else {}
        parts[part] = {**base, **{k: _as_list(v) for k, v in keywords.items() if k in names}}
    unknown = sorted(set(keywords) - {f.name for cls, _ in owners.values() for f in fields(cls)})
    if unknown:
        allowed = sorted({f.name for cls, _ in owners.values() for f in fields(cls)})
        raise ConfigError(f"audit(): unknown keyword {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return parts


def _as_list(value: Any) -> Any:
    # ranges, generators and arrays of seeds or alphas, as the config's lists; one value stays
    if isinstance(value, Iterable) and not isinstance(value, str | dict):
        return list(value)
    return value


def _in_process(executor):
    from kdaudit.executors import ExecutorConfig

    options = ExecutorConfig(executor) if isinstance(executor, str) else executor
    if options.name != "local" or (options.workers or 1) > 1:
        raise ConfigError(
            "audit(): models and data passed as Python objects exist only in this process, "
            "so they run with the local executor without workers; for worker processes or "
            "Ray, name them in a config (model: {factory: 'package.module:function'}, the "
            "same for data) and use `kdaudit run CONFIG --workers N` or `--executor ray`"
        )
    return options


def _check_outcome(out: Path, cfg: ExperimentConfig, outcome) -> None:
    """Raise when nothing can be reported (a teacher or every student failed); warn when
    some runs failed (the report leaves them out and shows the reduced n)."""
    from kdaudit.store import RunStore

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
    every run: import every named factory and user loss; on the local executor, also build
    the models (and load the checkpoint) on the data and call each loss once."""
    from kdaudit.conditions import condition
    from kdaudit.conditions.objectives import user_loss
    from kdaudit.data import load_data
    from kdaudit.engine.run import check_models
    from kdaudit.user_code import import_callable

    sections = {"data": cfg.data, "model": cfg.model,
                "protocol.student_model": cfg.protocol.student_model,
                "protocol.teacher_data": getattr(cfg.protocol, "teacher_data", None)}  # fmt: skip
    named = {k: s for k, s in sections.items() if getattr(s, "name", None) == "factory"}
    for key, section in named.items():
        import_callable(section.factory, f"{key}.factory")
    losses = [condition(n) for n in cfg.protocol.condition_names if condition(n).loss]
    for entry in losses:
        user_loss(entry)
    local = executor == "local" or getattr(executor, "name", None) == "local"
    if (named or losses or cfg.pretrained_teacher) and local:
        # the same cache key as the executor's load: this process loads the data once
        data = load_data(cfg.data, Path(data_dir).resolve() if data_dir else None)
        check_models(expand(cfg), data)


def report(out: str | Path, data_dir: str | Path | None = None, beside: Iterable[str | Path] = ()):
    """Analyse the complete runs stored in `out` and write `out/report/`; an AuditResult.
    `data_dir` is read only by grids whose report needs the test data (targeted error
    transfer). `beside`: run directories of other audits (say, the same grid with a
    RandAugment teacher) whose teachers' train loss and KD transfer the report's teacher
    table sets beside this one's."""
    from kdaudit.report import write_report
    from kdaudit.report.result import AuditResult
    from kdaudit.store.copied import copied_predictions, load_test_labels, stored_label_names
    from kdaudit.store.tables import targeted_transfer
    from kdaudit.store.target import check_writable

    out = Path(out)
    check_writable(out / "report", "report directory",
                   "copy the run directory somewhere writable and report that copy")  # fmt: skip
    cfg, runs, teachers, analysis = _analysed(out)
    targeted = targeted_transfer(out, cfg, expand(cfg), data_dir)
    regimes = _regimes([out, *beside]) if beside else None
    labels = load_test_labels(out, cfg, data_dir)
    names = stored_label_names(out)
    copied = None if labels is None else copied_predictions(out, expand(cfg), labels, names)
    path = write_report(out / "report", runs, teachers, analysis, title=f"kdaudit: {cfg.name}",
                        meta=_meta(out, cfg), targeted=targeted, regimes=regimes,
                        copied=copied, about=_about(out, cfg, labels))  # fmt: skip
    return AuditResult(out, runs, teachers, analysis, path)


def _about(out: Path, cfg: ExperimentConfig, labels):
    """What was audited, for the report's plain-words header."""
    from kdaudit.report import About

    state = status(out)
    student = cfg.protocol.student_model
    return About(
        dataset=_data_name(cfg.data),
        teacher_model=_model_name(cfg.model),
        student_model=None if student is None else _model_name(student),
        num_classes=None if labels is None else int(labels.max()) + 1,
        runs_complete=state["complete"],
        runs_total=state["total"],
        pretrained_teacher=cfg.pretrained_teacher,
        smoke=is_smoke(cfg),
    )


def _data_name(section) -> str:
    name = str(getattr(section, "name", "the data"))
    return {"in_memory": "the data passed to audit()", "files": "your files"}.get(name, name)


def _model_name(section) -> str:
    """'mlp', or a user factory's 'package.module:function'."""
    return str(getattr(section, "factory", None) or getattr(section, "name", "model"))


def _analysed(out: Path):
    from kdaudit.conditions import designs
    from kdaudit.stats import analyse
    from kdaudit.store import RunStore
    from kdaudit.store.tables import load_runs, load_teachers

    cfg = RunStore(out).load_experiment()
    grid = expand(cfg)
    runs, teachers = load_runs(out, grid), load_teachers(out, grid)
    if runs.empty:
        raise RuntimeError(f"{out} holds no complete student run yet; run `kdaudit run` first")
    return cfg, runs, teachers, analyse(runs, cfg.analysis, designs())


def _regimes(dirs: list):
    """The teacher-transfer rows of each audit, labelled by its name and by how its
    teachers were trained (the training keys in which they differ from the students)."""
    import pandas as pd

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
    from kdaudit.store import code_version

    state = status(out)
    meta = {
        "config": cfg.name,
        "runs": f"{state['complete']} complete of {state['total']}",
        **code_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if state["failed"]:
        meta["failed runs"] = "; ".join(
            f"{f['run_id']}: {f['error']}" for f in state["failed_runs"]
        )
    if cfg.pretrained_teacher:
        p = cfg.protocol
        meta["teacher"] = (
            f"pretrained ({Path(p.teacher_checkpoint).name}, sha256 {(p.teacher_sha256 or '?')[:12]}); "
            "students share their own initialisation per student seed, not the teacher's"
        )
    return meta


def status(out: str | Path) -> dict:
    """The state of a run directory: counts overall and per condition, failed and damaged
    runs, and the `kdaudit run` at work (kdaudit.store.status.grid_status)."""
    from kdaudit.store.status import grid_status

    return grid_status(out)


def compare(manifest: str | Path, out: str | Path | None = None, **options):
    """Audit saved test logits listed in a manifest CSV (an AuditResult with `notes`); see
    kdaudit.compare.compare for the options."""
    from kdaudit.compare import compare as compare_logits

    return compare_logits(manifest, out, **options)


def export(out: str | Path, manifest: str | Path | None = None, data_dir: str | Path | None = None):
    """Write a `compare` manifest of run directory `out`'s stored test logits (default
    OUT/manifest.csv), so the audit can be re-analysed or shared as logits only; returns
    (its path, the number of runs listed)."""
    from kdaudit.compare.export import export_manifest

    return export_manifest(out, manifest, data_dir)


def logits(model_dir: str | Path, corpus: str | Path, out: str | Path, options=None,
           on_batch=None):  # fmt: skip
    """Score a saved Hugging Face causal LM on a corpus and write its test logits (full, or
    top-k log-probabilities) for `compare`; resumes a run cut short. `options`: a
    kdaudit.hf.score.LogitsOptions; `on_batch(done, total, positions)` follows progress.
    Returns a LogitsResult (shape, throughput, the manifest row)."""
    from kdaudit.hf.score import LogitsOptions, score

    return score(model_dir, corpus, out, options or LogitsOptions(), on_batch)


def accuracy_by_condition(runs):
    """Mean, SEM and n of test accuracy per (teacher seed, condition, alpha, T, width)."""
    from kdaudit.store.tables import accuracy_by_condition as by_condition

    return by_condition(runs)


# Types a caller builds or catches, and plan(), loaded with the part of kdaudit that defines
# them.
_TYPES = {
    "AuditResult": "kdaudit.report.result",
    "CompareError": "kdaudit.compare.errors",
    "ExecutorConfig": "kdaudit.executors.core",
    "LogitsOptions": "kdaudit.hf.score",
    "Plan": "kdaudit.api.own_loop",
    "PlannedRun": "kdaudit.api.own_loop",
    "plan": "kdaudit.api.own_loop",  # kdaudit.plan(...): your own training loop (loads torch)
    "RichReporter": "kdaudit.executors.progress",
}


def __getattr__(name: str):
    if name in _TYPES:
        import importlib

        return getattr(importlib.import_module(_TYPES[name]), name)
    raise AttributeError(f"module 'kdaudit.api' has no attribute {name!r}")
