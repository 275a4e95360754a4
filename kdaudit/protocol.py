"""The grid of paired runs (PROTOCOL section 3), expanded from an experiment config.

Pairing rules, all in `_student`:
- a teacher with seed s is initialised from seed s and trained with data-order seed s;
- self-distillation: every student and control starts from its teacher's initial weights
  (init seed = teacher seed) and uses data-order seed = student seed;
- smaller-student distillation: all students of one student seed share the student
  initialisation (init seed = student seed) and the data order (student seed);
- a pretrained teacher (protocol.teacher_checkpoint) is loaded, not trained; its initial
  weights are unknown, so its students follow the smaller-student rule whatever their size;
- a control may change this on purpose (its registry entry's init_from, data_order_from):
  DISDO starts from the student seed's initialisation and uses the teacher's data order.
So for one (teacher seed, student seed) every condition gets the same init and the same
minibatches; only the objective differs. Feature-map conditions (fmkd, fmrc) too: their
projections and fixed random targets come from generators of their own, never from the
global RNG stream that draws dropout masks (kdaudit.conditions.features).

Capacity scaling (`protocol.student_widths`) adds a grid axis: the student's width field (the
one its model registry entry declares) set to a fraction of the teacher's. Every width is a
smaller-student setting, 100% included (init seed = student seed), so the whole sweep is one
regime; within one (teacher seed, student seed, width) the pairing above holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from kdaudit.conditions import condition
from kdaudit.config import ExperimentConfig, TrainConfig, to_dict
from kdaudit.errors import ConfigError

# Bump when a change to the engine changes what a run computes: old runs are not reused.
RUN_FORMAT = 1


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; its hash names the run directory."""

    condition: str
    teacher_seed: int
    student_seed: int | None  # None for a teacher
    alpha: float | None
    temperature: float | None
    init_seed: int
    data_seed: int  # seeds the minibatch order and the global RNG (dropout) of the run
    data: Any
    model: Any
    train: TrainConfig
    teacher_id: str | None = None  # the run id of this student's teacher
    # capacity grids: the student's width as a fraction of the teacher's (None elsewhere, so
    # the run ids of other grids do not change: fields at their default are not hashed)
    width: float | None = None
    # a teacher trained on other data than its students (protocol.teacher_data): their data,
    # on which its test outputs are computed for them (None: they share the teacher's data)
    students_data: Any = None
    # a pretrained teacher: its state_dict file, and that file's sha256 (the run id hashes
    # the sha256, not the path: the same weights elsewhere are the same run)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    # feature-map conditions: (student module, teacher module) pairs matched (else empty)
    feature_modules: tuple[tuple[str, str], ...] = ()
    # your own KD loss ('package.module:function'): a worker process that never read the
    # config builds the condition from it (kdaudit.conditions.loss_condition)
    loss: str | None = None
    # teacher-error sweep (protocol.teacher_label_noise): a teacher trains on labels with this
    # fraction replaced at random; its students (clean labels) carry it to name their setting.
    # None for the clean teacher, so run ids without the sweep do not change.
    label_noise: float | None = None

    @property
    def is_teacher(self) -> bool:
        return self.condition == "teacher"

    @property
    def label(self) -> str:
        parts = [self.condition]
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        if self.temperature is not None:
            parts.append(f"T{self.temperature:g}")
        if self.width is not None:
            parts.append(f"w{self.width:g}")
        if self.label_noise is not None:
            parts.append(f"noise{self.label_noise:g}")
        parts.append(f"t{self.teacher_seed}")
        if self.student_seed is not None:
            parts.append(f"s{self.student_seed}")
        return "_".join(parts)

    @property
    def run_id(self) -> str:
        fields = to_dict(self, drop_defaults=True)
        fields.pop("checkpoint", None)
        blob = json.dumps({"format": RUN_FORMAT, **fields}, sort_keys=True)
        return f"{self.label}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, **to_dict(self)}


@dataclass(frozen=True)
class TeacherPlan:
    """What a grid asks of its teachers, decided once from the config (the rest depends on
    the data: kdaudit.engine.teachers.keeps_weights)."""

    save_weights: bool = False  # store.save_weights: every run keeps its weights
    features: bool = False  # some students run the teacher model (feature-map conditions)


@dataclass(frozen=True)
class Grid:
    teachers: tuple[RunSpec, ...]
    students: tuple[RunSpec, ...]
    plan: TeacherPlan = TeacherPlan()

    @property
    def runs(self) -> tuple[RunSpec, ...]:
        """Teachers first: every student depends on its teacher."""
        return self.teachers + self.students

    def teacher_of(self, student: RunSpec) -> RunSpec:
        (teacher,) = [t for t in self.teachers if t.run_id == student.teacher_id]
        return teacher


def expand(cfg: ExperimentConfig) -> Grid:
    """The full grid: every teacher seed x teacher label noise x student seed x width x
    condition x (alpha, T)."""
    teachers = [_teacher(cfg, t_seed, noise) for t_seed in cfg.protocol.teacher_seeds
                for noise in cfg.protocol.noise_rates]  # fmt: skip
    students = [student for teacher in teachers for student in _students(cfg, teacher)]
    return Grid(tuple(teachers), tuple(students), teacher_plan(cfg))


def _students(cfg: ExperimentConfig, teacher: RunSpec) -> list[RunSpec]:
    """One teacher's students: every student seed x width x condition x (alpha, T)."""
    return [
        _student(cfg, teacher, s_seed, name, alpha, temp, width)
        for s_seed in cfg.protocol.student_seeds
        for width in cfg.protocol.student_widths or (None,)
        for name in cfg.protocol.condition_names
        for alpha, temp in _settings(cfg, name)
    ]


def teacher_plan(cfg: ExperimentConfig) -> TeacherPlan:
    features = any(condition(c).features for c in cfg.protocol.condition_names)
    return TeacherPlan(save_weights=cfg.store.save_weights, features=features)


def _teacher(cfg: ExperimentConfig, seed: int, noise: float | None = None) -> RunSpec:
    # protocol.teacher_data: a teacher trained on other data than its students (the planted
    # error of PROTOCOL 7.7); the students' data stays cfg.data
    data, students_data = cfg.data, None
    if cfg.protocol.teacher_data is not None:
        data, students_data = cfg.protocol.teacher_data, cfg.data
    train = cfg.protocol.teacher_train or cfg.train  # protocol.teacher_train: another regime
    return RunSpec("teacher", seed, None, None, None, seed, seed, data, cfg.model, train,
                   students_data=students_data, label_noise=noise, **_checkpoint(cfg))  # fmt: skip


def _checkpoint(cfg: ExperimentConfig) -> dict:
    """A pretrained teacher's file and sha256 (pinned in the config by `kdaudit run`)."""
    path = cfg.protocol.teacher_checkpoint
    if path is None:
        return {}
    from kdaudit.models.checkpoint import file_sha256

    return {
        "checkpoint": path,
        "checkpoint_sha256": cfg.protocol.teacher_sha256 or file_sha256(path),
    }


def _student(cfg, teacher: RunSpec, seed: int, name: str, alpha, temp, width=None) -> RunSpec:
    # A pretrained teacher's initial weights are unknown: its students share their own.
    shared_init = cfg.self_distillation and width is None and not cfg.pretrained_teacher
    entry = condition(name)
    init_seed = teacher.init_seed if shared_init and entry.init_from != "student" else seed
    data_seed = teacher.data_seed if entry.data_order_from == "teacher" else seed
    model = cfg.student_model if width is None else scaled_model(cfg, width)
    features = cfg.protocol.feature_pairs if condition(name).features else ()
    return RunSpec(
        name, teacher.teacher_seed, seed, alpha, temp, init_seed, data_seed,
        cfg.data, model, cfg.train, teacher.run_id, width=width, feature_modules=features,
        loss=cfg.protocol.loss_of(name), label_noise=teacher.label_noise,
    )  # fmt: skip


def scaled_model(cfg: ExperimentConfig, fraction: float):
    """The student model with its width field at `fraction` of the teacher's width, rounded
    to the nearest size the architecture allows (a multiple of its declared divisor, e.g.
    NanoGPT's n_embd a multiple of n_head), and never below one such multiple."""
    student = cfg.student_model
    field, divisor = width_field(student.name)
    teacher_field, _ = width_field(cfg.model.name)
    base = getattr(cfg.model, teacher_field)
    step = getattr(student, divisor) if divisor else 1
    width = max(step, round(base * fraction / step) * step)
    return replace(student, **{field: int(width)})


def width_field(model_name: str) -> tuple[str, str | None]:
    """(width field, field its width must be a multiple of) from the model registry."""
    from kdaudit.models import MODELS

    info = MODELS.get(model_name).info
    if "width" not in info:
        declared = [n for n in MODELS.names() if "width" in MODELS.get(n).info]
        raise ConfigError(
            f"protocol.student_widths: model {model_name!r} declares no width field; "
            f"models that do: {', '.join(declared)}"
        )
    return info["width"], info.get("width_multiple_of")


def _settings(cfg: ExperimentConfig, name: str) -> list[tuple[float | None, float | None]]:
    params = condition(name).params
    alphas = cfg.protocol.alphas if "alpha" in params else (None,)
    temps = cfg.protocol.temperatures if "temperature" in params else (None,)
    return [(a, t) for a in alphas for t in temps]


def _capped(train: TrainConfig, max_steps: int) -> TrainConfig:
    return replace(train, max_steps=min(train.max_steps or max_steps, max_steps))


SMOKE_SUFFIX = "-smoke"  # the name of a smoke run's config: its report says so


def smoke(cfg: ExperimentConfig, max_steps: int = 40) -> ExperimentConfig:
    """A config's grid and training shrunk to check, in about a minute, that it works:
    one teacher seed, two student seeds, every condition, the smallest and largest student
    width of a capacity grid and teacher label-noise rate of a teacher-error sweep, at most
    `max_steps` steps."""
    widths = cfg.protocol.student_widths
    noise = cfg.protocol.teacher_label_noise
    teacher_train = cfg.protocol.teacher_train
    protocol = replace(
        cfg.protocol,
        teacher_seeds=cfg.protocol.teacher_seeds[:1],
        student_seeds=cfg.protocol.student_seeds[:2],
        student_widths=tuple(sorted({min(widths), max(widths)})) if widths else (),
        teacher_label_noise=tuple(sorted({min(noise), max(noise)})),
        teacher_train=None if teacher_train is None else _capped(teacher_train, max_steps),
    )
    train = _capped(cfg.train, max_steps)
    return replace(cfg, name=f"{cfg.name}{SMOKE_SUFFIX}", train=train, protocol=protocol)


def is_smoke(cfg: ExperimentConfig) -> bool:
    return cfg.name.endswith(SMOKE_SUFFIX)
