"""Execute one run: build, train, evaluate, compare with the teacher, store."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from kdaudit.conditions import build_objective
from kdaudit.data import TensorData
from kdaudit.metrics import accuracy_and_loss, functional_similarity
from kdaudit.models import build_model
from kdaudit.protocol import RunSpec
from kdaudit.store import RunStore, code_version
from kdaudit.train import StepHook, predict, train


@dataclass
class TeacherOutputs:
    """Teachers' stored logits, loaded once per teacher and shared by all its students."""

    store: RunStore
    device: torch.device
    _train: dict[str, torch.Tensor] = field(default_factory=dict)

    def train_logits(self, teacher_id: str) -> torch.Tensor:  # (N_train, K) on the device
        if teacher_id not in self._train:
            array = np.asarray(self.store.array(teacher_id, "train_logits"))
            self._train[teacher_id] = torch.from_numpy(array.copy()).to(self.device)
        return self._train[teacher_id]

    def test_logits(self, teacher_id: str) -> np.ndarray:  # (N_test, K), memory-mapped
        return self.store.array(teacher_id, "test_logits")


def execute(
    spec: RunSpec,
    data: TensorData,
    store: RunStore,
    teachers: TeacherOutputs,
    save_weights: bool = False,
    on_step: StepHook | None = None,
) -> dict:
    """Train the run that `spec` describes and write it to the store; return its record."""
    start = time.perf_counter()
    device = data.train_x.device
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.init_seed).to(device)
    teacher_train = teachers.train_logits(spec.teacher_id) if _needs_teacher(spec) else None
    objective = build_objective(
        spec.condition, spec.alpha, spec.temperature, data.num_classes, teacher_train
    )
    result = train(model, data, objective, spec.train, spec.data_seed, on_step)
    test_logits = predict(model, data.test_x, spec.train.eval_batch_size)  # (N_test, K) fp32
    train_logits = predict(model, data.train_x, spec.train.eval_batch_size)
    record = {
        "metrics": _metrics(train_logits, data.train_y, test_logits, data.test_y),
        "steps": result.steps,
        "train_seconds": result.seconds,
    }
    arrays = {"test_logits": test_logits.numpy()}
    if spec.is_teacher:
        arrays["train_logits"] = train_logits.numpy()  # the students' KD targets
    else:
        teacher_test = teachers.test_logits(spec.teacher_id)
        record["similarity"] = functional_similarity(teacher_test, test_logits, data.test_y.cpu())
    record.update(_provenance(device, time.perf_counter() - start))
    weights = _weights(model) if save_weights else None
    store.write(spec, record, arrays, weights)
    return record


def _needs_teacher(spec: RunSpec) -> bool:
    from kdaudit.conditions import CONDITIONS

    return CONDITIONS.get(spec.condition).info["needs_teacher"]


def _metrics(train_logits, train_y, test_logits, test_y) -> dict[str, float]:
    train_acc, train_loss = accuracy_and_loss(train_logits, train_y.cpu())
    test_acc, test_loss = accuracy_and_loss(test_logits, test_y.cpu())
    return {"train_accuracy": train_acc, "train_loss": train_loss,
            "test_accuracy": test_acc, "test_loss": test_loss}  # fmt: skip


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _provenance(device: torch.device, seconds: float) -> dict:
    return {
        "seconds": seconds,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **code_version(),
    }
