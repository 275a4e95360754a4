"""What teacher and students must share to be compared position by position, and its checks.

Every file `kdaudit logits` writes gets a sidecar, FILE.kdaudit.json, that records the
sha256 of the tokenizer's vocabulary (token -> id, added tokens included), the sha256 and
shape of the corpus's token ids, and the logits per position (vocabulary size). Two files
are comparable when all three agree: the same tokenizer on the same corpus gives the same
ids, so position p and label y mean the same thing in both. A tokenizer with the same
vocabulary but other merges or normalisation gives other ids on the same text, which the
token check catches.

Checked against `--reference FILE` and against every file of `--manifest` that has a
sidecar, before any scoring; `--manifest` then gets the new row appended.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdaudit.hf import LogitsError

SIDECAR_SUFFIX = ".kdaudit.json"
FORMAT = "kdaudit-logits/1"
COLUMNS = ("role", "alpha", "temperature", "seed", "teacher_seed", "path")  # kdaudit compare's


@dataclass(frozen=True)
class Identity:
    tokenizer_sha256: str | None  # None: ids given as .npy and no tokenizer in the model folder
    tokens_sha256: str
    tokens_shape: tuple[int, int]  # (N, L) token ids
    vocab_size: int  # logits per position

    def to_dict(self) -> dict:
        return {"tokenizer_sha256": self.tokenizer_sha256, "tokens_sha256": self.tokens_sha256,
                "tokens_shape": list(self.tokens_shape), "vocab_size": self.vocab_size}  # fmt: skip


def tokens_sha256(ids: np.ndarray) -> str:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return hashlib.sha256(f"{ids.shape}".encode() + ids.tobytes()).hexdigest()


def tokenizer_sha256(tokenizer) -> str | None:
    """sha256 of the vocabulary (token -> id, sorted), None without a tokenizer."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict | None:
    side = sidecar_path(Path(path))
    try:
        record = json.loads(side.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LogitsError(f"{side}: unreadable ({err}); delete it and rescore {path}") from None
    return record if record.get("format") == FORMAT else None


def check_same(mine: Identity, other: dict, other_path: Path, model_dir: Path) -> None:
    """LogitsError when the file `other_path` (its sidecar `other`) cannot be compared with
    the model at `model_dir` scored on this corpus."""
    theirs = other["identity"]
    a, b = mine.tokenizer_sha256, theirs.get("tokenizer_sha256")
    if a and b and a != b:
        raise LogitsError(
            f"{model_dir}'s tokenizer differs from the one that scored {other_path} "
            f"(vocabulary sha256 {a[:12]} vs {b[:12]}): teacher and students must share one "
            "tokenizer, or their positions and token ids mean different things; save the "
            "teacher's tokenizer with every student (or distil into the teacher's vocabulary)"
        )
    if mine.tokens_sha256 != theirs["tokens_sha256"]:
        raise LogitsError(
            f"the corpus tokenizes to other ids here than for {other_path} ({mine.tokens_shape} vs "
            f"{tuple(theirs['tokens_shape'])} tokens): score every model on the same corpus "
            "with the same tokenizer"
        )
    if mine.vocab_size != theirs["vocab_size"]:
        raise LogitsError(
            f"{model_dir} outputs {mine.vocab_size} logits per position, the model of "
            f"{other_path} {theirs['vocab_size']}: teacher and students must share the "
            "vocabulary (pad the smaller output layer to the same size)"
        )


def check_reference(mine: Identity, reference: Path, model_dir: Path) -> None:
    other = read_sidecar(reference)
    if other is None:
        raise LogitsError(f"--reference {reference}: no {SIDECAR_SUFFIX} sidecar beside it; "
                          "give a file written by `kdaudit logits`")  # fmt: skip
    check_same(mine, other, reference, model_dir)


# ---------------------------------------------------------------- the manifest row


@dataclass(frozen=True)
class ManifestRow:
    """The model's row in a `kdaudit compare` manifest (kdaudit/compare/manifest.py)."""

    role: str  # teacher, or a student condition (siddo, kd, rcd, ...)
    seed: int  # the student seed; a teacher's own seed
    alpha: float | None = None
    temperature: float | None = None
    teacher_seed: int | None = None  # None: 0 for students, the seed for a teacher

    def __post_init__(self) -> None:
        from kdaudit.conditions import CONDITIONS, builtin

        roles = sorted(c.name for c in builtin())
        if self.role not in CONDITIONS:
            raise LogitsError(f"--role {self.role!r} is not a role; roles: {', '.join(roles)}")
        params = CONDITIONS.get(self.role).params
        if "alpha" in params and self.alpha is None:
            raise LogitsError(f"--role {self.role} needs --alpha (the KD weight it trained with)")
        for name in ("alpha", "temperature"):
            if getattr(self, name) is not None and name not in params:
                raise LogitsError(f"--role {self.role} takes no --{name}; leave it out")

    def values(self, path: str) -> dict[str, str]:
        teacher_seed = self.teacher_seed
        if teacher_seed is None:
            teacher_seed = self.seed if self.role == "teacher" else 0
        return {"role": self.role, "alpha": _text(self.alpha),
                "temperature": _text(self.temperature), "seed": str(self.seed),
                "teacher_seed": str(teacher_seed), "path": path}  # fmt: skip


def _text(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def csv_line(values: dict[str, str], columns=COLUMNS) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([values.get(c, "") for c in columns])
    return buf.getvalue()


def _key(values: dict[str, str]) -> tuple:
    """A row's identity in a manifest (kdaudit compare refuses two rows with one key)."""
    number = lambda v: float(v) if v else None  # noqa: E731
    temperature = number(values.get("temperature", ""))
    if temperature is None and values.get("alpha"):
        temperature = 1.0  # compare's default for an empty temperature
    teacher_seed = values.get("teacher_seed") or (values["seed"] if values["role"] == "teacher"
                                                  else "0")  # fmt: skip
    return (values["role"], number(values.get("alpha", "")), temperature, int(values["seed"]),
            int(teacher_seed))  # fmt: skip


def _rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or ()]
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k}
                for r in reader if any((v or "").strip() for v in r.values() if v)]  # fmt: skip
    missing = [c for c in ("role", "seed", "path") if c not in header]
    if missing:
        raise LogitsError(f"--manifest {manifest}: no column {missing[0]!r}; a kdaudit compare "
                          f"manifest has columns {','.join(COLUMNS)}")  # fmt: skip
    return header, rows


def check_manifest(mine: Identity, manifest: Path, labels: np.ndarray, model_dir: Path) -> None:
    """Before scoring: every file of `manifest` with a sidecar, and its labels file, must
    fit this model and corpus (a manifest that does not exist yet is fine)."""
    if not manifest.is_file():
        return
    rows = _rows(manifest)[1]
    paths = [((manifest.parent / r["path"]).resolve(), r["role"]) for r in rows]
    for path, role in paths:  # the models first: their sidecars say what differs
        if role != "labels" and path.is_file() and (other := read_sidecar(path)) is not None:
            check_same(mine, other, path, model_dir)
    for path, role in paths:
        if role == "labels":
            _check_labels_file(path, labels, manifest)


def _check_labels_file(path: Path, labels: np.ndarray, manifest: Path) -> None:
    if not path.is_file():
        return
    theirs = np.load(path, mmap_mode="r")
    if theirs.shape != labels.shape or not np.array_equal(theirs, labels):
        raise LogitsError(f"--manifest {manifest}: its labels {path} (shape {theirs.shape}) are "
                          f"not this corpus's next tokens {labels.shape}: the manifest's models "
                          "were scored on another corpus or tokenizer")  # fmt: skip


def append_row(manifest: Path, row: ManifestRow, path: Path, labels: Path | None) -> str:
    """Append the model's row (and a labels row when the manifest has none) to `manifest`,
    created with kdaudit compare's header if absent; the same row again is a no-op. Returns
    the row as written. Holds an exclusive lock while reading and appending, so models
    scored at once append safely."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "a+", newline="", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        header, rows = _rows(manifest) if manifest.stat().st_size else (list(COLUMNS), [])
        values = row.values(_relative(path, manifest))
        new = _new_rows(manifest, header, rows, values, labels)
        if not manifest.stat().st_size:
            f.write(csv_line(dict(zip(COLUMNS, COLUMNS, strict=True))) + "\n")
        elif not manifest.read_bytes().endswith(b"\n"):
            f.write("\n")  # a last line without its newline, as an editor may leave it
        for line in new:
            f.write(csv_line(line, header) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return csv_line(values, header)


def _new_rows(manifest: Path, header: list[str], rows: list[dict], values: dict,
              labels: Path | None) -> list[dict]:  # fmt: skip
    if "teacher_seed" not in header and _key(values) == _key({**values, "teacher_seed": ""}):
        values = {**values, "teacher_seed": ""}  # the default, which compare assumes
    needed = [c for c, v in values.items() if v and c not in header]
    if needed:
        raise LogitsError(f"--manifest {manifest} has no column {needed[0]!r} for this row; "
                          f"add it to the header ({','.join(COLUMNS)})")  # fmt: skip
    new = []
    if labels is not None and not any(r["role"] == "labels" for r in rows):
        new.append({"role": "labels", "path": _relative(labels, manifest)})
    key = _key(values)
    for r in rows:
        if r["role"] != "labels" and _key(r) == key:
            if (manifest.parent / r["path"]).resolve() == path_of(values, manifest):
                return new  # this row is there already: a rerun
            raise LogitsError(f"--manifest {manifest} already lists {key[0]} seed {key[3]} "
                              f"(teacher seed {key[4]}) as {r['path']}; give another --seed "
                              "or remove that row")  # fmt: skip
    return [*new, values]


def path_of(values: dict, manifest: Path) -> Path:
    return (manifest.parent / values["path"]).resolve()


def _relative(path: Path, manifest: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(manifest.parent.resolve()))
    except ValueError:
        return str(path)
