"""Pretrained weights: a state_dict file (.safetensors, .pt or .pth) loaded into a built model,
with errors that name every key and shape that does not fit."""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from kdaudit.user_code import UserCodeError

SUFFIXES = (".safetensors", ".pt", ".pth")
SHOWN = 5  # mismatched keys named per kind in an error


class CheckpointError(UserCodeError):
    """A teacher checkpoint is missing, unreadable, changed, or does not fit the model."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, cached while its size and modification time stay the same."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, checked against `sha256` when given."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"teacher checkpoint {path}: expected a {', '.join(SUFFIXES)} file")
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist")
    blob = path.read_bytes()
    if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
        raise CheckpointError(
            f"teacher checkpoint {path} changed since this audit pinned it (sha256 {sha256[:12]}); "
            "restore it, or remove protocol.teacher_sha256 to audit the new file"
        )
    state = _deserialise(path, blob)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"teacher checkpoint {path}: expected a state_dict (names -> "
                              "tensors), as saved by torch.save(model.state_dict(), path)")  # fmt: skip
    return state


def _deserialise(path: Path, blob: bytes):
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            return load(blob)
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"teacher checkpoint {path} is unreadable ({err})") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, or raise naming the keys and shapes that do not fit."""
    problems = mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"teacher checkpoint {source} does not fit the model: "
                              f"{'; '.join(problems)}")  # fmt: skip
    model.load_state_dict(state)


def mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in given and given[k].shape != v.shape]  # fmt: skip
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):  # fmt: skip
        if items:
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:SHOWN])}{more}")
    return problems


def state_dict_bytes(model: nn.Module) -> bytes:
    """A model's weights as a .safetensors file's bytes (deterministic: same weights, same
    bytes, so the file's sha256 identifies the weights)."""
    from safetensors.torch import save

    # Cloned: tied parameters share memory, which safetensors refuses.
    return save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()})
