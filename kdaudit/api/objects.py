"""An experiment config from the user's Python objects, for `kdaudit.audit()`.

The objects get config sections with stable fingerprints (data: the sha256 of its tensors;
a model factory: its name, the architecture it builds and the sha256 of its seed-0 weights;
a pretrained teacher: the sha256 of its weights, saved to OUT/teacher.safetensors by
save_pretrained_teacher once the call has passed every check), so the same call twice expands to the same run ids and resumes. The objects themselves stay in this process (kdaudit.user_code).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdaudit.config import ExperimentConfig, from_dict, to_dict
from kdaudit.data import TensorData
from kdaudit.data.user import in_memory_data, tensor_data
from kdaudit.errors import ConfigError, UserCodeError
from kdaudit.models.checkpoint import file_sha256, state_dict_bytes
from kdaudit.models.factory import in_memory_model, output_size
from kdaudit.user_code import reference_of

TEACHER_FILE = "teacher.safetensors"


def experiment_from_objects(
    model: Callable[[int], nn.Module],
    train: Any,
    test: Any,
    *,
    teacher: nn.Module | Callable[[int], nn.Module] | None,
    out: Path,
    name: str,
    num_classes: int | None,
    protocol: dict,
    training: dict,
    analysis: Any = None,  # kdaudit.config.AnalysisOptions
    save_weights: bool = False,
) -> tuple[ExperimentConfig, TensorData]:
    """The experiment `audit()` runs, and the materialised data it registered."""
    if not callable(model) or isinstance(model, nn.Module):
        raise UserCodeError("model: expected a factory, a function from a seed (int) to a new "
                            "nn.Module (e.g. lambda seed: MyNet()); got "
                            f"{type(model).__name__}")  # fmt: skip
    data = tensor_data(train, test, num_classes, "audit()")
    models, pretrained = _model_sections(model, teacher, data, out)
    raw = {
        "name": name,
        "data": in_memory_data(data),
        "model": models["model"],
        "train": training,
        # one pretrained teacher is one teacher seed (a label: it trains nothing)
        "protocol": {
            **({"teacher_seeds": [0]} if pretrained else {}),
            **protocol,
            **pretrained,
            "student_model": models["student"],
        },
        "store": {"save_weights": save_weights},
    }
    if analysis is not None:
        raw["analysis"] = to_dict(analysis)
    return from_dict(ExperimentConfig, raw), data


def save_pretrained_teacher(cfg: ExperimentConfig, teacher: Any) -> Path | None:
    """OUT/teacher.safetensors of a pretrained teacher, written only once the call has
    passed the config's checks, so a refused call neither leaves nor replaces one; the
    path when this call created the file (None: none needed, or it was already there)."""
    if not (cfg.pretrained_teacher and isinstance(teacher, nn.Module)):
        return None
    path = Path(cfg.protocol.teacher_checkpoint)
    existed = path.is_file()
    write_teacher(teacher, path, cfg.protocol.teacher_sha256)
    return None if existed else path


def _model_sections(model, teacher, data: TensorData, out: Path) -> tuple[dict, dict]:
    """Config sections for the teacher's and students' models, and the protocol keys of a
    pretrained teacher."""
    expect = (data.input_shape, data.num_classes)
    if teacher is None:  # self-distillation: teachers trained from the same factory
        return {"model": in_memory_model(model, expect=expect), "student": None}, {}
    student = in_memory_model(model, role="student model", expect=expect)
    if isinstance(teacher, nn.Module):
        check_teacher_classes(teacher, data)
        path, sha256 = (out / TEACHER_FILE).resolve(), weights_sha256(teacher)
        section = in_memory_model(lambda seed: copy.deepcopy(teacher).cpu(),
                                  name=reference_of(type(teacher)))  # fmt: skip
        keys = {"teacher_checkpoint": str(path), "teacher_sha256": sha256}
        return {"model": section, "student": student}, keys
    if callable(teacher):  # teachers trained from their own factory
        section = in_memory_model(teacher, role="teacher", expect=expect)
        return {"model": section, "student": student}, {}
    raise UserCodeError(f"teacher: expected a trained nn.Module, a model factory or None; "
                        f"got {type(teacher).__name__}")  # fmt: skip


def check_teacher_classes(teacher: nn.Module, data: TensorData) -> None:
    k = output_size(teacher, data.input_shape, "teacher")
    if k != data.num_classes:
        raise ConfigError(
            f"teacher: it outputs {k} classes per example but the dataset has "
            f"{data.num_classes} (labels 0..{data.num_classes - 1}); pass the teacher trained "
            f"on these classes, or num_classes={k} when the data lacks some of its classes"
        )


def weights_sha256(teacher: nn.Module) -> str:
    return hashlib.sha256(state_dict_bytes(teacher)).hexdigest()


def write_teacher(teacher: nn.Module, path: Path, sha256: str) -> None:
    """The teacher's weights at `path`, rewritten only when they changed, so that a rerun
    finds the same file."""
    if path.is_file() and file_sha256(path) == sha256:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(state_dict_bytes(teacher))
    os.replace(tmp, path)
