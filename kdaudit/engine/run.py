"""One run: build, train, evaluate, compare with the teacher, store."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone

import torch

from kdaudit.conditions import condition
from kdaudit.conditions.features import find_modules
from kdaudit.conditions.objectives import build_objective, check_user_loss
from kdaudit.engine.evaluate import evaluate, predict
from kdaudit.engine.loop import StepHook, TrainResult
from kdaudit.engine.stacking import train_one
from kdaudit.engine.teachers import (
    Teachers,
    label_noise_record,
    load_teacher,
    teacher_arrays,
    with_teacher_labels,
)
from kdaudit.metrics.streaming import accuracy_and_loss, functional_similarity
from kdaudit.models import build_model
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore, code_version


def execute(
    spec: RunSpec,
    data,  # TensorData or TokenData (kdaudit.data)
    store: RunStore,
    teachers: Teachers,
    save_weights: bool = False,
    on_step: StepHook | None = None,
    stack: bool = True,
) -> dict:
    """Train the run that `spec` describes and write it to the store; return its record.
    `stack`: whether a run that can trains as a stack of one (kdaudit.engine.stacking.train_one)."""
    start = time.perf_counter()
    if spec.checkpoint is not None:
        model, result = load_teacher(spec, data), TrainResult(0, 0.0)
    else:
        model, objective = build_run(spec, data, teachers)
        result = train_one(model, data, objective, spec.train, spec.data_seed, on_step, stack)
    return finish_run(spec, model, result, data, store, teachers, save_weights, start)


def check_models(grid, data) -> None:
    """Build the grid's teacher (loading its checkpoint), each student model and each user
    loss once, so that user code or a checkpoint that does not fit stops the audit before
    any run, rather than failing every run alike."""
    teacher = grid.teachers[0]
    if teacher.checkpoint is not None:
        load_teacher(teacher, data)
    else:
        build_model(teacher.model, data.input_shape, data.num_classes, teacher.init_seed)
    for model in {s.model for s in grid.students}:
        build_model(model, data.input_shape, data.num_classes, 0)
    _check_feature_modules(grid, data)
    for name in {s.condition for s in grid.students if condition(s.condition).loss}:
        check_user_loss(condition(name), data.num_classes)


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


def build_run(spec: RunSpec, data, teachers: Teachers):
    """The run's initial model (on the data's device) and its objective."""
    if spec.checkpoint is not None:  # never trained: `execute` loads it
        raise ValueError(f"{spec.run_id} is a pretrained teacher: run it with execute()")
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed)
    model = model.to(data.device)
    objective = build_objective(spec.condition, spec.alpha, spec.temperature, data.num_classes,
                                teachers.targets(spec, data), model)  # fmt: skip
    return model, with_teacher_labels(spec, data, objective)


def finish_run(
    spec: RunSpec,
    model: torch.nn.Module,
    result: TrainResult,
    data,
    store: RunStore,
    teachers: Teachers,
    save_weights: bool,
    start: float,  # time.perf_counter() when the run (or its stack) started
) -> dict:
    """Evaluate a trained model, compare it with its teacher, write the run; its record."""
    batch_size = spec.train.eval_batch_size
    test_logits = predict(model, data, "test", batch_size)  # (N_test, K) fp32
    test_labels = data.labels("test").cpu()
    arrays = {"test_logits": test_logits.numpy()}
    if spec.is_teacher:
        arrays.update(teacher_arrays(spec, model, data, teachers.students_data(spec)))
    if "train_logits" in arrays:
        train_metrics = accuracy_and_loss(arrays["train_logits"], data.labels("train").cpu())
    else:
        train_metrics = evaluate(model, data, "train", batch_size, spec.train.eval_train_limit)
    record = {
        "metrics": _metrics(train_metrics, accuracy_and_loss(test_logits, test_labels)),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "engine": result.engine,  # stacking and device speed-ups used
    }
    if spec.is_teacher and spec.label_noise is not None:
        record["label_noise"] = label_noise_record(spec, data, arrays.get("train_logits"))
    if spec.checkpoint is not None:  # loaded, not trained: 0 steps
        record["pretrained"] = {"checkpoint": spec.checkpoint, "sha256": spec.checkpoint_sha256}
    if not spec.is_teacher:
        teacher_test = teachers.test_logits(spec, data)
        record["similarity"] = functional_similarity(teacher_test, test_logits, test_labels)
    record.update(_provenance(data.device, time.perf_counter() - start))
    store.write(spec, record, arrays, _weights(model) if save_weights else None)
    return record


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
