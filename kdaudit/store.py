"""Run records on disk. A run directory is either complete or absent.

    DIR/experiment.yaml          the resolved experiment config of the latest `kdaudit run`
    DIR/runs/<run_id>/           one complete run:
        spec.json                the resolved run config (its hash is in run_id)
        record.json              metrics, similarity to the teacher, timings, versions
        test_logits.npy          (N_test, K) fp32
        train_logits.npy         (N_train, K) fp32, teachers only (the students' KD targets)
        weights.safetensors      optional
    DIR/failed/<run_id>.json     a run that raised: its error, traceback and step

A run is written into DIR/runs/.tmp-*, then renamed into place in one step, so a crash or
kill -9 can leave only a temporary directory, which the next start removes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from kdaudit.config import ExperimentConfig, dump_yaml, from_dict
from kdaudit.protocol import RunSpec

RECORD = "record.json"


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.failed = self.root / "failed"

    # ------------------------------------------------------------ experiment
    def save_experiment(self, cfg: ExperimentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / "experiment.yaml", dump_yaml(cfg))

    def load_experiment(self) -> ExperimentConfig:
        import yaml

        path = self.root / "experiment.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.root} holds no experiment.yaml: is it the --out directory of `kdaudit run`?"
            )
        return from_dict(ExperimentConfig, yaml.safe_load(path.read_text()))

    # ------------------------------------------------------------ queries
    def is_complete(self, run_id: str) -> bool:
        return (self.runs / run_id / RECORD).is_file()

    def failure(self, run_id: str) -> dict | None:
        path = self.failed / f"{run_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record(self, run_id: str) -> dict:
        return json.loads((self.runs / run_id / RECORD).read_text())

    def array(self, run_id: str, name: str) -> np.ndarray:
        """A stored array, memory-mapped (read-only)."""
        return np.load(self.runs / run_id / f"{name}.npy", mmap_mode="r")

    # ------------------------------------------------------------ writing
    def write(
        self,
        spec: RunSpec,
        record: dict[str, Any],
        arrays: dict[str, np.ndarray],
        weights: dict | None = None,
    ) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        tmp = self.runs / f".tmp-{spec.run_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_json(tmp / "spec.json", spec.to_dict())
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            if weights is not None:
                from safetensors.torch import save_file

                save_file(weights, tmp / "weights.safetensors")
            _write_json(tmp / RECORD, {"run_id": spec.run_id, "status": "complete", **record})
            _fsync_dir(tmp)
            final = self.runs / spec.run_id
            if final.exists():  # finished meanwhile by another worker: keep the first
                shutil.rmtree(tmp)
                return final
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (self.failed / f"{spec.run_id}.json").unlink(missing_ok=True)
        return final

    def write_failure(self, spec: RunSpec, error: str, traceback: str, step: int | None) -> None:
        self.failed.mkdir(parents=True, exist_ok=True)
        record = {"run_id": spec.run_id, "status": "failed", "error": error,
                  "step": step, "traceback": traceback, "spec": spec.to_dict()}  # fmt: skip
        _atomic_write_text(self.failed / f"{spec.run_id}.json", _json(record))

    def clean_temporary(self) -> int:
        """Remove what runs in flight left behind when the process died."""
        stale = list(self.runs.glob(".tmp-*")) if self.runs.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)


def _json(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, sort_keys=False)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: store non-finite floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(_json(obj))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """kdaudit's version and, when run from a git checkout, its commit."""
    from kdaudit import __version__

    commit = ""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )  # fmt: skip
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"kdaudit": __version__, "git_commit": commit}
