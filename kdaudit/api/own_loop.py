"""Your own training loop under kdaudit's protocol: `kdaudit.plan(...)`.

kdaudit supplies the paired grid and collects what you trained; your loop (a Hugging Face
`Trainer`, TRL, Lightning, plain PyTorch) does the training:

    plan = kdaudit.plan("runs/mine", teacher_seeds=[0], student_seeds=range(10, 15),
                        alphas=[0.9], temperatures=[1.0], conditions=["siddo", "kd", "rcd"],
                        num_classes=65)
    for run in plan.pending():              # teachers first, then their students
        torch.manual_seed(run.init_seed)    # the initial weights: the teacher's, in
        model = build()                     # self-distillation
        torch.manual_seed(run.data_seed)    # dropout draws, as kdaudit's own loop
        for idx in batches(run.sampler(n)): # the paired data order
            loss = run.loss(model(x[idx]), y[idx], teacher(x[idx]) if run.needs_teacher else None)
            ...
        run.record(test_logits, test_labels)
    plan.report()                           # the AuditResult of kdaudit.audit

The run directory is an ordinary one (kdaudit.store): `kdaudit status` and `kdaudit report`
read it, a recorded run is never pending again, and a crash loses only the runs in flight.
The grid, run ids, seeds and objectives are kdaudit's (kdaudit.protocol.expand,
kdaudit.conditions.objectives), not copies: the same grid trained by kdaudit's engine pairs
its runs identically (tests/test_plan.py trains both and compares).

The runs' model and data sections name the plan, not your code (kdaudit never builds
them): `recipe` (any JSON-able description of your model, data and training) is hashed
into the run ids, so a changed recipe is a new set of runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdaudit.conditions import CONDITIONS, condition
from kdaudit.conditions.objectives import Batch, build_objective
from kdaudit.config import AnalysisOptions, ConfigError, ExperimentConfig, from_dict, to_dict
from kdaudit.protocol import RunSpec, expand
from kdaudit.store import RunStore, StoreLocked, atomic_save_array, code_version

OWN_LOOP = "your own training loop (kdaudit.plan)"
IGNORE_INDEX = -100  # labels of positions without a target (Hugging Face's convention)


def plan(
    out: str | Path,
    *,
    teacher_seeds: Iterable[int],
    student_seeds: Iterable[int],
    alphas: Iterable[float],
    temperatures: Iterable[float],
    conditions: Iterable[Any],
    num_classes: int,
    same_architecture: bool = True,
    name: str = "plan",
    recipe: Any = None,
    analysis: AnalysisOptions | None = None,
) -> Plan:
    """The paired grid of an audit whose models you train yourself, stored in `out`.

    conditions: registered names (siddo, kd, rcd, ls) or your own KD loss as
        {"factory": "package.module:function", "name": NAME}; feature-map conditions need
        kdaudit's engine. num_classes: K of the logits (the vocabulary for a language model).
    same_architecture: True (self-distillation): students start from their teacher's initial
        weights (init seed = teacher seed); False: a student architecture of its own, or a
        teacher whose initial weights you do not have: every run of one student seed starts
        from the same initialisation, init seed = student seed.
    recipe: JSON-able description of your model, data and training, hashed into the run ids.
    Holds the run directory (as `kdaudit run` does) until `close()` or the process ends.
    """
    cfg = _experiment(name, num_classes, recipe, same_architecture, analysis, {
        "teacher_seeds": [int(s) for s in teacher_seeds],
        "student_seeds": [int(s) for s in student_seeds],
        "alphas": [float(a) for a in alphas], "temperatures": [float(t) for t in temperatures],
        "conditions": list(conditions),
    })  # fmt: skip
    return Plan(out, cfg, num_classes)


def _experiment(
    name, num_classes, recipe, same_architecture, analysis, protocol
) -> ExperimentConfig:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"plan(): num_classes must be an integer >= 2 (K of the logits, the "
                          f"vocabulary size for a language model), got {num_classes!r}")  # fmt: skip
    identity = json.dumps({"num_classes": num_classes, "recipe": recipe}, sort_keys=True,
                          default=repr)  # fmt: skip
    digest = lambda role: hashlib.sha256(f"{role}:{identity}".encode()).hexdigest()  # noqa: E731
    model = {"name": "in_memory", "factory": OWN_LOOP, "fingerprint": digest("teacher")}
    student = None if same_architecture else {**model, "fingerprint": digest("student")}
    raw = {"name": name, "data": {"name": "in_memory", "sha256": digest("data")},
           "model": model, "protocol": {**protocol, "student_model": student}}  # fmt: skip
    if analysis is not None:
        raw["analysis"] = to_dict(analysis)
    features = [
        c
        for c in protocol["conditions"]
        if isinstance(c, str) and c in CONDITIONS and condition(c).features
    ]
    if features:
        raise ConfigError(f"plan(): {features[0]} matches features inside the models, which "
                          "needs kdaudit's own engine; use kdaudit.audit() or `kdaudit run`")  # fmt: skip
    return from_dict(ExperimentConfig, raw)


class Plan:
    """The grid of one run directory; see kdaudit.api.own_loop.plan."""

    def __init__(self, out: str | Path, cfg: ExperimentConfig, num_classes: int):
        self.out, self.cfg, self.num_classes = Path(out), cfg, num_classes
        self.store = RunStore(self.out)
        self.grid = expand(cfg)
        self._held = ExitStack()
        try:
            self._held.enter_context(self.store.lock())  # one writer per directory
        except StoreLocked:
            if (self.store.lock_holder() or {}).get("pid") != os.getpid():
                raise
            raise StoreLocked(f"{self.out} is held by an earlier plan of this process: call "
                              "its close() first (or open plans with `with kdaudit.plan(...) "
                              "as plan:`)") from None  # fmt: skip
        self.store.recover()  # damaged runs moved aside: pending again
        self.store.save_experiment(cfg)

    def pending(self) -> Iterator[PlannedRun]:
        """The runs not recorded yet, teachers first (each student needs its teacher's test
        outputs when recorded). Checked as it goes: a run recorded meanwhile is skipped."""
        for spec in self.grid.runs:
            if not self.store.is_complete(spec.run_id):
                self.store.mark_running(spec.run_id)  # `kdaudit status` lists it in flight
                yield PlannedRun(self, spec)

    def runs(self) -> list[PlannedRun]:
        """Every run of the grid, recorded or not."""
        return [PlannedRun(self, spec) for spec in self.grid.runs]

    def record_teacher(self, teacher_seed: int, test_logits, labels, **train: float) -> None:
        """Record a teacher you trained or loaded (see PlannedRun.record)."""
        specs = [t for t in self.grid.teachers if t.teacher_seed == teacher_seed]
        if not specs:
            seeds = [t.teacher_seed for t in self.grid.teachers]
            raise ConfigError(f"record_teacher: no teacher seed {teacher_seed} in this plan "
                              f"(teacher seeds: {seeds})")  # fmt: skip
        PlannedRun(self, specs[0]).record(test_logits, labels, **train)

    def status(self) -> dict:
        from kdaudit.store.status import grid_status

        return grid_status(self.out)

    def report(self):
        """Analyse the recorded runs and write OUT/report/: the AuditResult of kdaudit.audit."""
        from kdaudit.api import report

        return report(self.out)

    def close(self) -> None:
        """Release the run directory (also released when the process ends)."""
        self._held.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlannedRun:
    """One run of the grid: who it is, how it is paired, its objective, and its record."""

    def __init__(self, plan: Plan, spec: RunSpec):
        self._plan, self.spec = plan, spec
        self._objective = None
        self._teacher_rows: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"PlannedRun({self.run_id})"

    # who and how it is paired (kdaudit.protocol)
    run_id = property(lambda self: self.spec.run_id)
    label = property(lambda self: self.spec.label)
    condition = property(lambda self: self.spec.condition)
    alpha = property(lambda self: self.spec.alpha)
    temperature = property(lambda self: self.spec.temperature)
    teacher_seed = property(lambda self: self.spec.teacher_seed)
    student_seed = property(lambda self: self.spec.student_seed)
    init_seed = property(lambda self: self.spec.init_seed)
    data_seed = property(lambda self: self.spec.data_seed)
    is_teacher = property(lambda self: self.spec.is_teacher)

    @property
    def needs_teacher(self) -> bool:
        """Its loss needs the teacher's logits on the same batch (kd, your own KD loss)."""
        return condition(self.condition).needs_teacher

    @property
    def num_classes(self) -> int:
        return self._plan.num_classes

    def sampler(self, n: int) -> PairedSampler:
        """The run's data order over a dataset of n examples (see PairedSampler)."""
        return PairedSampler(n, self.data_seed)

    def loss(self, student_logits: torch.Tensor, labels: torch.Tensor,
             teacher_logits: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The condition's objective on one batch, a scalar tensor: (N, K) logits with (N,)
        labels, or (N, T, V) with (N, T), every position one example (for a causal LM, the
        logits at t with the token at t + 1). Labels equal to -100 are left out. Computed
        in fp32 like kdaudit's own loop; teacher_logits (same shape) only for conditions
        that need them (kd: yes; siddo, rcd, ls, teacher: no)."""
        z, y, zt = self._rows(student_logits, labels, teacher_logits)
        if self.needs_teacher and zt is None:
            raise ValueError(f"{self.label}: the {self.condition} loss needs teacher_logits, "
                             "the teacher's logits on the same batch")  # fmt: skip
        self._teacher_rows = zt
        try:
            return self._built()(z.float(), Batch(None, None, y))
        finally:
            self._teacher_rows = None  # the batch's teacher logits are not kept

    def _rows(self, z: torch.Tensor, y: torch.Tensor, zt: torch.Tensor | None):
        k = self.num_classes
        if z.shape[-1] != k:
            raise ValueError(f"{self.label}: logits have {z.shape[-1]} classes, the plan "
                             f"num_classes={k}")  # fmt: skip
        if z.shape[:-1] != y.shape:
            raise ValueError(f"{self.label}: logits {tuple(z.shape)} and labels "
                             f"{tuple(y.shape)} do not match: labels are logits.shape[:-1]")  # fmt: skip
        if zt is not None and zt.shape != z.shape:
            raise ValueError(f"{self.label}: teacher logits {tuple(zt.shape)} and student "
                             f"logits {tuple(z.shape)} differ in shape")  # fmt: skip
        z, y = z.reshape(-1, k), y.reshape(-1)  # every position one example
        zt = None if zt is None else zt.reshape(-1, k).detach()
        keep = y != IGNORE_INDEX
        if not bool(keep.all()):
            z, y, zt = z[keep], y[keep], None if zt is None else zt[keep]
        return z, y, zt

    def _built(self):
        if self._objective is None:
            self._objective = build_objective(
                self.condition, self.alpha, self.temperature, self.num_classes,
                lambda batch: self._teacher_rows, None,
            )  # fmt: skip
        return self._objective

    def record(self, test_logits, labels, *, train_loss: float | None = None,
               train_accuracy: float | None = None) -> None:  # fmt: skip
        """Store the trained model's test outputs: test_logits (N, K) or (N, T, V) (a tensor,
        an array or a .npy file) and labels (N,) or (N, T); a student is compared with its
        teacher (recorded first) on the same examples. train_loss, train_accuracy: optional,
        for the report's teacher table."""
        _record(self._plan, self.spec, test_logits, labels,
                {"train_loss": train_loss, "train_accuracy": train_accuracy})  # fmt: skip


class PairedSampler(torch.utils.data.Sampler):
    """A run's data order over n examples: each iteration (an epoch) is the next permutation
    torch.randperm(n) draws from one generator seeded by the run's data seed. This is the
    order of kdaudit's own loop (kdaudit.engine.loop.batch_order): cut into consecutive
    batches of B it gives the engine's minibatches, so every condition of one
    (teacher seed, student seed) sees the same batches, and a new sampler starts again at
    the first epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"sampler(n): n is the number of training examples, got {n}")
        self.n, self.seed = n, seed
        self._generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self._generator).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------- recording


def _record(plan: Plan, spec: RunSpec, test_logits, labels, train: dict) -> None:
    logits, y = _as_rows(test_logits, plan.num_classes, spec.label), _as_labels(labels)
    if len(y) != len(logits):
        raise ValueError(f"{spec.label}: {len(logits)} rows of logits but {len(y)} labels")
    if y.min() < 0 or y.max() >= plan.num_classes:
        raise ValueError(f"{spec.label}: test labels span {int(y.min())}..{int(y.max())}, "
                         f"outside 0..{plan.num_classes - 1}")  # fmt: skip
    store = plan.store
    if store.is_complete(spec.run_id):
        _check_same_record(store, spec, logits)
        return
    _keep_labels(plan.out, y, spec)
    from kdaudit.metrics.streaming import accuracy_and_loss, functional_similarity

    accuracy, loss = accuracy_and_loss(logits, y)
    record = {
        "metrics": {**train, "test_accuracy": accuracy, "test_loss": loss},
        "steps": None,
        "engine": {"loop": OWN_LOOP},
    }
    if not spec.is_teacher:
        teacher = _teacher_record(store, spec, logits.shape)
        record["similarity"] = functional_similarity(teacher, logits, y)
    store.write(spec, {**record, **_provenance()}, {"test_logits": logits})
    store.clear_running(spec.run_id)


def _as_rows(logits, k: int, label: str) -> np.ndarray:
    """(rows, K) float32, every leading position one row."""
    if isinstance(logits, str | Path):
        logits = np.load(logits, mmap_mode="r")
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    array = np.asarray(logits)
    if array.ndim < 2 or array.shape[-1] != k:
        raise ValueError(f"{label}: test logits have shape {array.shape}; expected (N, {k}) or "
                         f"(N, T, {k}) for num_classes={k}")  # fmt: skip
    return np.ascontiguousarray(array.reshape(-1, k), dtype=np.float32)


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    return y.astype(np.int64)


def _keep_labels(out: Path, y: np.ndarray, spec: RunSpec) -> None:
    """The test labels, kept once in the run directory (kdaudit.store.copied reads them
    there: kdaudit never loads the data of your own loop); every run must share them."""
    from kdaudit.store.copied import TEST_LABELS

    path = out / TEST_LABELS
    if not path.is_file():
        atomic_save_array(path, y)
    elif not np.array_equal(np.load(path, mmap_mode="r"), y):
        raise ValueError(f"{spec.label}: its test labels differ from those recorded before "
                         f"({path}); record every model on the same test examples in the same "
                         "order")  # fmt: skip


def _teacher_record(store: RunStore, spec: RunSpec, shape) -> np.ndarray:
    """The teacher's stored test logits."""
    if not store.is_complete(spec.teacher_id):
        raise ValueError(f"{spec.label}: its teacher (seed {spec.teacher_seed}) is not "
                         "recorded yet; record it first (plan.record_teacher, or the "
                         "teacher's PlannedRun.record)")  # fmt: skip
    teacher = store.array(spec.teacher_id, "test_logits")  # on the same labels: _keep_labels
    if teacher.shape != shape:
        raise ValueError(f"{spec.label}: test logits {shape} but the teacher's {teacher.shape}")
    return teacher


def _check_same_record(store: RunStore, spec: RunSpec, logits: np.ndarray) -> None:
    """Recording a recorded run again: the same outputs are a no-op, others an error."""
    if not np.array_equal(store.array(spec.run_id, "test_logits"), logits):
        raise ValueError(f"{spec.label} is recorded already with other test outputs; a "
                         "changed model is a new audit: give plan() another out or recipe")  # fmt: skip


def _provenance() -> dict:
    return {"host": platform.node(), "torch": torch.__version__,
            "python": platform.python_version(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **code_version()}  # fmt: skip
