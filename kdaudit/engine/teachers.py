"""Everything about a teacher: how its students get its outputs, and what it keeps.

A teacher is trained like any run, or loaded from a checkpoint (`load_teacher`). When it
is stored it keeps (`keeps_weights`): its test logits always; its logits on the unaugmented
training set when its students can use them cached (`cached`: one output per example, no
augmentation), its logits on its students' test data when it trained on other data
(protocol.teacher_data), and its weights whenever a student must run it (augmented batches,
text windows, feature-map conditions, other data) or the config asks for them.

A student's KD target (`Teachers.targets`) is then the cached logits per index, or a
forward pass of the teacher on the student's batch (one per batch, shared by a stack), or
for feature-map conditions the teacher model itself (a FeatureSetup).

A teacher of the teacher-error sweep (protocol.teacher_label_noise; its spec's label_noise)
trains on noisy labels (`noisy_labels`): round(rate * N) training labels, chosen at random,
each replaced by a class drawn uniformly from the other K - 1, so every chosen label changes
and the realised error rate of its labels is round(rate * N) / N. The draw is a pure function
of (teacher seed, rate) (`noise_seed`): the same labels in every run of the grid, other
labels at another rate or seed. Only the teacher's objective sees them; the data, and with it
every student, keeps the clean labels. Its record keeps the realised fraction and its train
accuracy and loss on its noisy labels (`label_noise_record`); its metrics are on clean labels.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kdaudit.conditions import condition
from kdaudit.conditions.features import PROBE, FeatureSetup
from kdaudit.conditions.objectives import Batch, CachedTargets, Objective, TeacherTargets
from kdaudit.engine.evaluate import predict
from kdaudit.metrics.streaming import accuracy_and_loss
from kdaudit.models import build_model
from kdaudit.models.checkpoint import load_into, read_state_dict
from kdaudit.protocol import RunSpec, TeacherPlan
from kdaudit.store import STUDENTS_TEST_LOGITS as STUDENTS_TEST
from kdaudit.store import RunStore


def cached(spec: RunSpec, data) -> bool:
    """Whether students take the teacher's outputs cached per example. A run's
    train.augment is the students' setting too in one grid: the teacher stores its weights
    whenever its own grid's students cannot use cached outputs."""
    return data.cacheable and spec.train.augment == "none"


def keeps_weights(spec: RunSpec, plan: TeacherPlan, data) -> bool:
    """Whether a run stores its weights: every run when the config saves weights; a teacher
    when a student will run it (see the module doc)."""
    if plan.save_weights:
        return True
    if not spec.is_teacher:
        return False
    return plan.features or spec.students_data is not None or not cached(spec, data)


def load_teacher(spec: RunSpec, data) -> torch.nn.Module:
    """A pretrained teacher: the model `spec.model` builds, with the checkpoint's weights."""
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed)
    state = read_state_dict(spec.checkpoint, spec.checkpoint_sha256)
    load_into(model, state, spec.checkpoint)
    return model.to(data.device)


def teacher_arrays(spec: RunSpec, model, data, students_data) -> dict[str, np.ndarray]:
    """What a finished teacher stores besides its test logits: its training-set logits (the
    cached KD targets) and, trained on other data, its test logits on its students' data."""
    arrays = {}
    if data.cacheable:
        arrays["train_logits"] = predict(model, data, "train", spec.train.eval_batch_size).numpy()
    if spec.students_data is not None:
        on_students = predict(model, students_data, "test", spec.train.eval_batch_size)
        arrays[STUDENTS_TEST] = on_students.numpy()
    return arrays


def noise_seed(teacher_seed: int, rate: float) -> int:
    """The seed of one (teacher seed, rate)'s noisy labels: fixed, and distinct per pair."""
    digest = hashlib.sha256(f"label_noise:{teacher_seed}:{rate!r}".encode()).hexdigest()
    return int(digest[:15], 16)


def noisy_labels(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> torch.Tensor:
    """`labels` (N,) with round(rate * N) of them, at random, moved to another class drawn
    uniformly from the other K - 1 (a CPU generator: the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    cpu = labels.cpu()
    changed = torch.randperm(len(cpu), generator=gen)[: round(rate * len(cpu))]
    shift = torch.randint(1, num_classes, (len(changed),), generator=gen)  # never 0: a change
    noisy = cpu.clone()
    noisy[changed] = (cpu[changed] + shift) % num_classes
    return noisy.to(labels.device)


def teacher_labels(spec: RunSpec, data) -> torch.Tensor:
    """A noisy teacher's training labels (N,), on the data's device."""
    if not data.cacheable:
        raise ValueError(f"{spec.run_id}: protocol.teacher_label_noise replaces one label per "
                         "example; this dataset's labels are sequences: use [0.0]")  # fmt: skip
    seed = noise_seed(spec.teacher_seed, spec.label_noise)
    return noisy_labels(data.labels("train"), data.num_classes, spec.label_noise, seed)


def with_teacher_labels(spec: RunSpec, data, objective: Objective) -> Objective:
    """A noisy teacher's objective on its noisy labels; any other run's unchanged."""
    if not spec.is_teacher or spec.label_noise is None:
        return objective
    labels = teacher_labels(spec, data)
    return lambda logits, batch: objective(
        logits, replace(batch, y=labels.index_select(0, batch.idx))
    )


def label_noise_record(spec: RunSpec, data, train_logits: np.ndarray | None) -> dict:
    """What a noisy teacher's record keeps: the rate asked for, the seed, the labels changed,
    and its train accuracy and loss on the noisy labels it trained on (when it has train
    logits: every dataset with one label per example)."""
    clean, noisy = data.labels("train").cpu(), teacher_labels(spec, data).cpu()
    changed = int((clean != noisy).sum())
    record = {"rate": spec.label_noise, "seed": noise_seed(spec.teacher_seed, spec.label_noise),
              "changed": changed, "n": len(clean), "fraction": changed / len(clean)}  # fmt: skip
    if train_logits is not None:
        accuracy, loss = accuracy_and_loss(train_logits, noisy)
        record.update(noisy_train_accuracy=accuracy, noisy_train_loss=loss)
    return record


def cached_targets(train_logits: torch.Tensor) -> CachedTargets:
    """The teacher's logits on the unaugmented training set (N, K), looked up per batch."""
    return CachedTargets(train_logits)


def model_targets(teacher: torch.nn.Module) -> TeacherTargets:
    """A forward pass of the (eval-mode) teacher on the batch the student sees. The last
    batch's outputs are kept: students trained as one stack (kdaudit.engine.stacking) are
    handed the same Batch, and one teacher forward pass serves them all."""
    teacher.eval()
    last: list = [None, None]  # [the batch's inputs (kept alive, so never a reused id), logits]

    def targets(batch: Batch) -> torch.Tensor:
        if last[0] is not batch.x:
            with torch.no_grad():
                last[:] = batch.x, teacher(batch.x).flatten(0, -2)  # (B, K) or (B * T, V)
        return last[1]

    return targets


class TeacherNotComplete(RuntimeError):
    """A student's teacher failed, or is neither complete nor running: the student is
    blocked (it runs again once its teacher exists), not failed."""


def wait_for_teacher(store: RunStore, teacher_id: str, poll: float = 0.05,
                     patience: float = 120.0) -> None:  # fmt: skip
    """Return once the teacher is complete. A student that trains without its teacher's
    outputs (SIDDO, RCD) may start while the teacher trains, to use a worker that would
    otherwise wait (kdaudit.executors.local), and needs the teacher only to be compared
    with it. Raises TeacherNotComplete when the teacher fails, or when for `patience`
    seconds it is neither complete nor running (its worker died, or it was never started;
    a teacher is marked running only once its worker has loaded the data, which can take
    minutes the first time, hence the generous patience)."""
    idle_since = None
    while not store.is_complete(teacher_id):
        if store.failure(teacher_id) is not None:
            raise TeacherNotComplete(f"its teacher {teacher_id} failed")
        if store.is_running(teacher_id):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > patience:
            raise TeacherNotComplete(f"its teacher {teacher_id} is not running")
        time.sleep(poll)


@dataclass
class Teachers:
    """The stored teachers of a grid, as their students need them: loaded once per teacher
    and shared by all its students (of a worker process)."""

    store: RunStore
    device: torch.device
    load: Callable | None = None  # data config -> data on the device (students' data)
    _train: dict[str, torch.Tensor] = field(default_factory=dict)
    _models: dict[str, torch.nn.Module] = field(default_factory=dict)
    _targets: dict[str, TeacherTargets] = field(default_factory=dict)
    _cached: dict[str, CachedTargets] = field(default_factory=dict)
    _on_students_data: dict[str, np.ndarray] = field(default_factory=dict)

    def targets(self, spec: RunSpec, data):
        """What a student trains on, None if its condition uses no teacher: the cached
        logits, a teacher forward pass per batch (augmented batches, random windows, a
        teacher of other data), or for feature-map conditions a FeatureSetup."""
        entry = condition(spec.condition)
        if not entry.needs_teacher:
            return None
        if entry.features:
            return self._feature_setup(spec, data)
        if cached(spec, data) and not self.other_data(spec):
            if spec.teacher_id not in self._cached:  # one per teacher: a stack looks it up once
                self._cached[spec.teacher_id] = cached_targets(self.train_logits(spec.teacher_id))
            return self._cached[spec.teacher_id]
        return self._model_targets(spec.teacher_id, data)

    def other_data(self, student: RunSpec) -> bool:
        """The student's teacher trained on other data (protocol.teacher_data)."""
        return self.store.spec(student.teacher_id).get("students_data") is not None

    def train_logits(self, teacher_id: str) -> torch.Tensor:  # (N_train, K) on the device
        if teacher_id not in self._train:
            array = np.asarray(self.store.array(teacher_id, "train_logits"))
            self._train[teacher_id] = torch.from_numpy(array.copy()).to(self.device)
        return self._train[teacher_id]

    def test_logits(self, student: RunSpec, data) -> np.ndarray:  # (N_test, K)
        """The teacher's test logits on the student's test set: the stored ones (on the
        students' data, for a teacher trained on other data; from its weights for a teacher
        stored before such logits were kept). A student that trained beside its teacher
        waits here for it (`wait_for_teacher`)."""
        key = student.teacher_id
        wait_for_teacher(self.store, key)
        if not self.other_data(student):
            return self.store.array(key, "test_logits")
        if self.store.has_array(key, STUDENTS_TEST):
            return self.store.array(key, STUDENTS_TEST)
        if key not in self._on_students_data:
            logits = predict(self.model(key, data), data, "test", student.train.eval_batch_size)
            self._on_students_data[key] = logits.numpy()
        return self._on_students_data[key]

    def _model_targets(self, teacher_id: str, data) -> TeacherTargets:
        """One callable per teacher: the students of a stack share it, and with it one
        teacher forward pass per batch."""
        if teacher_id not in self._targets:
            self._targets[teacher_id] = model_targets(self.model(teacher_id, data))
        return self._targets[teacher_id]

    def model(self, teacher_id: str, data) -> torch.nn.Module:
        """The trained teacher, rebuilt from its stored config and weights."""
        if teacher_id not in self._models:
            self._models[teacher_id] = self._load_model(teacher_id, data)
        return self._models[teacher_id]

    def _load_model(self, teacher_id: str, data) -> torch.nn.Module:
        from safetensors.torch import load_file

        from kdaudit.config import parse_registered

        spec = self.store.spec(teacher_id)
        path = self.store.runs / teacher_id / "weights.safetensors"
        if not path.is_file():  # a teacher stored before a grid that needs its weights
            raise FileNotFoundError(
                f"teacher {teacher_id} has no stored weights, which these students need; "
                "delete its run directory to retrain it (its weights are then kept)"
            )
        cfg = parse_registered("model", spec["model"])
        model = build_model(cfg, data.input_shape, data.num_classes, spec["init_seed"])
        model.load_state_dict(load_file(path))
        return model.to(self.device)

    def _feature_setup(self, spec: RunSpec, data) -> FeatureSetup:
        idx = torch.arange(min(PROBE, data.n_train), device=data.device)
        probe, _ = data.train_batch(idx, "none")  # (P, ...): unaugmented, no random draws
        teacher = self.model(spec.teacher_id, data)
        return FeatureSetup(teacher, spec.feature_modules, probe, spec.init_seed, spec.data_seed)

    def students_data(self, spec: RunSpec):
        """A teacher's students' data, when it trains on other data (else None)."""
        if spec.students_data is None:
            return None
        if self.load is None:
            raise RuntimeError(f"{spec.run_id} trains on other data than its students: "
                               "Teachers needs `load` to read the students' data")  # fmt: skip
        return self.load(spec.students_data)
