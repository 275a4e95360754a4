"""The corpus as token ids (N, L): a text tokenized as a whole, or ids given.

- `.txt`: the file's text (UTF-8);
- `.jsonl`: one JSON object per line, its `text` field; the documents are joined with a
  newline into one text (decision: one corpus, tokenized once, like a .txt);
- `.npy`: token ids, (L,) one sequence or (N, L) N sequences of one length, scored each on
  its own (no window crosses rows).

A text is tokenized with no special tokens added (no BOS/EOS): the positions are those of
the text alone, the same for every model that shares the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdaudit.hf import LogitsError

FORMATS = (".txt", ".jsonl", ".npy")
TEXT_FIELD = "text"


def read_text(path: Path) -> str:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                texts.append(_document(line, line_no, path))
    if not texts:
        raise LogitsError(f"{path}: no documents; give one JSON object per line with a "
                          f"{TEXT_FIELD!r} field")  # fmt: skip
    return "\n".join(texts)


def _document(line: str, line_no: int, path: Path) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise LogitsError(f"{path} line {line_no}: not JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LogitsError(f"{path} line {line_no}: needs a string field {TEXT_FIELD!r} "
                          f"(found {keys})")  # fmt: skip
    return record[TEXT_FIELD]


def read_ids(path: Path) -> np.ndarray:
    """Token ids from a .npy file: (N, L) int64."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise LogitsError(f"{path}: not a readable .npy array ({err})") from None
    if ids.dtype.kind not in "iu":
        raise LogitsError(f"{path}: token ids must be integers, got {ids.dtype}")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise LogitsError(f"{path}: token ids must be (L,) or (N, L), got shape {ids.shape}")
    if ids.min() < 0:
        raise LogitsError(f"{path}: negative token id {int(ids.min())}")
    return np.ascontiguousarray(ids.reshape(-1, ids.shape[-1]), dtype=np.int64)


def load_corpus(path: str | Path, tokenizer) -> np.ndarray:
    """Token ids (N, L) int64 of the corpus at `path`; `tokenizer` (None: ids only) encodes
    a text as a whole with no special tokens."""
    path = Path(path)
    if not path.is_file():
        raise LogitsError(f"corpus not found: {path}")
    if path.suffix not in FORMATS:
        raise LogitsError(f"{path}: unknown corpus format {path.suffix!r}; give one of "
                          f"{', '.join(FORMATS)}")  # fmt: skip
    if path.suffix == ".npy":
        return read_ids(path)
    if tokenizer is None:
        raise LogitsError(f"{path} is text but the model folder has no tokenizer; save it "
                          "there (tokenizer.save_pretrained) or give token ids as .npy")  # fmt: skip
    ids = tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(1, -1)
