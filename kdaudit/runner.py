"""Execute one run: build, train, evaluate, compare with the teacher, store."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from kdaudit.conditions import TeacherTargets, build_objective, cached_targets, model_targets
from kdaudit.features import PROBE, FeatureSetup, find_modules
from kdaudit.metrics import accuracy_and_loss, functional_similarity
from kdaudit.models import build_model
from kdaudit.models.checkpoint import load_into, read_state_dict
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore, code_version
from kdaudit.train import StepHook, TrainResult, evaluate, predict, train


@dataclass
class TeacherOutputs:
    """Teachers' stored logits, loaded once per teacher and shared by all its students."""

    store: RunStore
    device: torch.device
    _train: dict[str, torch.Tensor] = field(default_factory=dict)
    _models: dict[str, torch.nn.Module] = field(default_factory=dict)
    _targets: dict[str, TeacherTargets] = field(default_factory=dict)
    _on_students_data: dict[str, np.ndarray] = field(default_factory=dict)

    def train_logits(self, teacher_id: str) -> torch.Tensor:  # (N_train, K) on the device
        if teacher_id not in self._train:
            array = np.asarray(self.store.array(teacher_id, "train_logits"))
            self._train[teacher_id] = torch.from_numpy(array.copy()).to(self.device)
        return self._train[teacher_id]

    def test_logits(self, teacher_id: str) -> np.ndarray:  # (N_test, K), memory-mapped
        return self.store.array(teacher_id, "test_logits")

    def other_data(self, student: RunSpec) -> bool:
        """The student's teacher trained on other data (protocol.teacher_data)."""
        return self.store.spec(student.teacher_id).get("students_data") is not None

    def student_test_logits(self, student: RunSpec, data) -> np.ndarray:  # (N_test, K)
        """The teacher's test logits on the student's test set: the stored ones, or, for a
        teacher trained on other data, its predictions on `data` (once per teacher)."""
        if not self.other_data(student):
            return self.test_logits(student.teacher_id)
        key = student.teacher_id
        if key not in self._on_students_data:
            model = self.model(key, data)
            logits = predict(model, data, "test", student.train.eval_batch_size)
            self._on_students_data[key] = logits.numpy()
        return self._on_students_data[key]

    def targets(self, teacher_id: str, data) -> TeacherTargets:
        """The teacher's forward pass on a student's batch, one callable per teacher: the
        students of a stack share it, and with it one forward pass per batch."""
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


def execute(
    spec: RunSpec,
    data,  # TensorData or TokenData (kdaudit.data)
    store: RunStore,
    teachers: TeacherOutputs,
    save_weights: bool = False,
    on_step: StepHook | None = None,
) -> dict:
    """Train the run that `spec` describes and write it to the store; return its record."""
    start = time.perf_counter()
    if spec.checkpoint is not None:
        model, result = load_teacher(spec, data), TrainResult(0, 0.0)
    else:
        model, objective = build_run(spec, data, teachers)
        result = train(model, data, objective, spec.train, spec.data_seed, on_step)
    return finish_run(spec, model, result, data, store, teachers, save_weights, start)


def check_models(grid, data) -> None:
    """Build the grid's teacher (loading its checkpoint) and each student model once, so that
    user code or a checkpoint that does not fit stops the audit before any run, rather than
    failing every run alike."""
    teacher = grid.teachers[0]
    if teacher.checkpoint is not None:
        load_teacher(teacher, data)
    else:
        build_model(teacher.model, data.input_shape, data.num_classes, teacher.init_seed)
    for model in {s.model for s in grid.students}:
        build_model(model, data.input_shape, data.num_classes, 0)
    _check_feature_modules(grid, data)


def _check_feature_modules(grid, data) -> None:
    """Feature-map students name modules of both models: check the names before any run."""
    teachers = {t.run_id: t.model for t in grid.teachers}
    features = [s for s in grid.students if s.feature_modules]
    for student, teacher, pairs in {(s.model, teachers[s.teacher_id], s.feature_modules)
                                    for s in features}:  # fmt: skip
        _check_names(student, tuple(s for s, _ in pairs), "student", data)
        _check_names(teacher, tuple(t for _, t in pairs), "teacher", data)


def _check_names(model_cfg, names: tuple[str, ...], role: str, data) -> None:
    model = build_model(model_cfg, data.input_shape, data.num_classes, 0)
    find_modules(model, names, role)


def load_teacher(spec: RunSpec, data) -> torch.nn.Module:
    """A pretrained teacher: the model `spec.model` builds, with the checkpoint's weights."""
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed)
    state = read_state_dict(spec.checkpoint, spec.checkpoint_sha256)
    load_into(model, state, spec.checkpoint)
    return model.to(data.device)


def build_run(spec: RunSpec, data, teachers: TeacherOutputs):
    """The run's initial model (on the data's device) and its objective."""
    if spec.checkpoint is not None:  # never trained: `execute` loads it
        raise ValueError(f"{spec.run_id} is a pretrained teacher: run it with execute()")
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed)
    model = model.to(data.device)
    teacher = _teacher_targets(spec, data, teachers) if _needs_teacher(spec) else None
    objective = build_objective(
        spec.condition, spec.alpha, spec.temperature, data.num_classes, teacher, model
    )
    return model, objective


def finish_run(
    spec: RunSpec,
    model: torch.nn.Module,
    result: TrainResult,
    data,
    store: RunStore,
    teachers: TeacherOutputs,
    save_weights: bool,
    start: float,  # time.perf_counter() when the run (or its stack) started
) -> dict:
    """Evaluate a trained model, compare it with its teacher, write the run; its record."""
    device = data.device
    batch_size = spec.train.eval_batch_size
    test_logits = predict(model, data, "test", batch_size)  # (N_test, K) fp32
    test_labels = data.labels("test").cpu()
    arrays = {"test_logits": test_logits.numpy()}
    if spec.is_teacher and data.cacheable:
        train_logits = predict(model, data, "train", batch_size)  # the students' KD targets
        arrays["train_logits"] = train_logits.numpy()
        train_metrics = accuracy_and_loss(train_logits, data.labels("train").cpu())
    else:
        train_metrics = evaluate(model, data, "train", batch_size, spec.train.eval_train_limit)
    record = {
        "metrics": _metrics(train_metrics, accuracy_and_loss(test_logits, test_labels)),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "engine": result.engine,  # stacking and device speed-ups used
    }
    if spec.checkpoint is not None:  # loaded, not trained: 0 steps
        record["pretrained"] = {"checkpoint": spec.checkpoint, "sha256": spec.checkpoint_sha256}
    if not spec.is_teacher:
        teacher_test = teachers.student_test_logits(spec, data)
        record["similarity"] = functional_similarity(teacher_test, test_logits, test_labels)
    record.update(_provenance(device, time.perf_counter() - start))
    # Without cached outputs, KD students need the teacher itself (a forward pass per batch).
    # A teacher trained on other data than its students' runs on their data from its weights.
    other = spec.is_teacher and spec.students_data is not None
    keep = save_weights or other or (spec.is_teacher and not _cached(spec, data))
    weights = _weights(model) if keep else None
    store.write(spec, record, arrays, weights)
    return record


def _teacher_targets(spec: RunSpec, data, teachers: TeacherOutputs):
    """Cached per-example teacher logits, unless the student sees augmented batches or
    random windows (sequences): then the teacher runs on each batch. Feature-map conditions
    get the teacher model itself (kdaudit.features)."""
    if spec.feature_modules:
        return _feature_setup(spec, data, teachers)
    if _cached(spec, data) and not teachers.other_data(spec):
        return cached_targets(teachers.train_logits(spec.teacher_id))
    return teachers.targets(spec.teacher_id, data)


def _feature_setup(spec: RunSpec, data, teachers: TeacherOutputs) -> FeatureSetup:
    idx = torch.arange(min(PROBE, data.n_train), device=data.device)
    probe, _ = data.train_batch(idx, "none")  # (P, ...): unaugmented, no random draws
    teacher = teachers.model(spec.teacher_id, data)
    return FeatureSetup(teacher, spec.feature_modules, probe, spec.init_seed, spec.data_seed)


def _cached(spec: RunSpec, data) -> bool:
    # A run's train.augment is the students' setting too in one grid: the teacher stores
    # its weights whenever its own grid's students cannot use cached outputs.
    return data.cacheable and spec.train.augment == "none"


def _needs_teacher(spec: RunSpec) -> bool:
    from kdaudit.conditions import CONDITIONS

    return CONDITIONS.get(spec.condition).info["needs_teacher"]


def _metrics(train: tuple[float, float], test: tuple[float, float]) -> dict[str, float]:
    """(accuracy, loss) of each split as the record's metrics."""
    return {"train_accuracy": train[0], "train_loss": train[1],
            "test_accuracy": test[0], "test_loss": test[1]}  # fmt: skip


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Cloned: tied parameters (GPT's embedding and head) share memory, which safetensors
    # refuses; stored twice, they load back into the one tied parameter.
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _provenance(device: torch.device, seconds: float) -> dict:
    return {
        "seconds": seconds,
        "device": str(device),
        "host": platform.node(),
        # CPU results are bitwise reproducible for a fixed intra-op thread count only.
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **code_version(),
    }
