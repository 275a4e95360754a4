"""The grid of paired runs (PROTOCOL section 3), expanded from an experiment config.

Pairing rules, all in `_student`:
- a teacher with seed s is initialised from seed s and trained with data-order seed s;
- self-distillation: every student and control starts from its teacher's initial weights
  (init seed = teacher seed) and uses data-order seed = student seed;
- smaller-student distillation: all students of one student seed share the student
  initialisation (init seed = student seed) and the data order (student seed).
So for one (teacher seed, student seed) every condition gets the same init and the same
minibatches; only the objective differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from kdaudit.conditions import CONDITIONS
from kdaudit.config import ExperimentConfig, TrainConfig, to_dict

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
        parts.append(f"t{self.teacher_seed}")
        if self.student_seed is not None:
            parts.append(f"s{self.student_seed}")
        return "_".join(parts)

    @property
    def run_id(self) -> str:
        blob = json.dumps(
            {"format": RUN_FORMAT, **to_dict(self, drop_defaults=True)}, sort_keys=True
        )
        return f"{self.label}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, **to_dict(self)}


@dataclass(frozen=True)
class Grid:
    teachers: tuple[RunSpec, ...]
    students: tuple[RunSpec, ...]

    @property
    def runs(self) -> tuple[RunSpec, ...]:
        """Teachers first: every student depends on its teacher."""
        return self.teachers + self.students

    def teacher_of(self, student: RunSpec) -> RunSpec:
        (teacher,) = [t for t in self.teachers if t.run_id == student.teacher_id]
        return teacher


def expand(cfg: ExperimentConfig) -> Grid:
    """The full grid: every teacher seed x student seed x condition x (alpha, T)."""
    teachers, students = [], []
    for t_seed in cfg.protocol.teacher_seeds:
        teacher = _teacher(cfg, t_seed)
        teachers.append(teacher)
        for s_seed in cfg.protocol.student_seeds:
            for name in cfg.protocol.conditions:
                for alpha, temp in _settings(cfg, name):
                    students.append(_student(cfg, teacher, s_seed, name, alpha, temp))
    return Grid(tuple(teachers), tuple(students))


def _teacher(cfg: ExperimentConfig, seed: int) -> RunSpec:
    return RunSpec("teacher", seed, None, None, None, seed, seed, cfg.data, cfg.model, cfg.train)


def _student(cfg, teacher: RunSpec, seed: int, name: str, alpha, temp) -> RunSpec:
    init_seed = teacher.init_seed if cfg.self_distillation else seed
    return RunSpec(
        name, teacher.teacher_seed, seed, alpha, temp, init_seed, seed,
        cfg.data, cfg.student_model, cfg.train, teacher.run_id,
    )  # fmt: skip


def _settings(cfg: ExperimentConfig, name: str) -> list[tuple[float | None, float | None]]:
    params = CONDITIONS.get(name).info["params"]
    alphas = cfg.protocol.alphas if "alpha" in params else (None,)
    temps = cfg.protocol.temperatures if "temperature" in params else (None,)
    return [(a, t) for a in alphas for t in temps]


def smoke(cfg: ExperimentConfig, max_steps: int = 40) -> ExperimentConfig:
    """A config's grid and training shrunk to check, in about a minute, that it works:
    one teacher seed, two student seeds, every condition, at most `max_steps` steps."""
    steps = min(cfg.train.max_steps or max_steps, max_steps)
    protocol = replace(
        cfg.protocol,
        teacher_seeds=cfg.protocol.teacher_seeds[:1],
        student_seeds=cfg.protocol.student_seeds[:2],
    )
    return replace(
        cfg, name=f"{cfg.name}-smoke", train=replace(cfg.train, max_steps=steps), protocol=protocol
    )
