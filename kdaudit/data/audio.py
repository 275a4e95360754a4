"""Audio datasets as log-mel spectrograms (N, 1, n_mels, frames): FSDD, Speech Commands v2
and UrbanSound8K.

Each dataset lists its clips (relative paths, labels, the train/test split), checking the
files; the features of all clips are computed once (see `audio_features`) and kept in the
cache directory (kdaudit.data.cache) as `audio/features-<key>.npz`, where the key hashes the
feature settings and the file list with sizes. Features are standardised with one mean and one standard deviation over
all values of the training split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import struct
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from kdaudit.data import TensorData
from kdaudit.data.audio_features import LogMel, load_clip, log_mel
from kdaudit.data.cache import cached_arrays
from kdaudit.data.configs import FSDDConfig, SpeechCommandsConfig, UrbanSound8KConfig
from kdaudit.data.files import DatasetMissing, Resource, ensure

FEATURES_VERSION = 1  # bump when the feature code changes: old caches are then ignored
CHUNK = 256  # clips per feature batch: bounds memory while the STFT stays batched

SPEECH_COMMANDS = Resource(
    "speech_commands_v0.02.tar.gz",
    url="https://storage.googleapis.com/download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
    # published by TensorFlow Datasets (speech_commands/checksums.tsv) and torchaudio
    sha256="af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
)
URBANSOUND8K = Resource(
    "UrbanSound8K.tar.gz",
    url="https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz",
    md5="9aa69802bbf37fb986f71ec1483a196e",  # published by Zenodo (record 1203745)
)
WORDS = (  # Speech Commands v2's 35 words; the label is the index in this sorted tuple
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on",
    "one", "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual",
    "wow", "yes", "zero",
)  # fmt: skip
FSDD_NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")  # {digit}_{speaker}_{index}.wav


# ---------------------------------------------------------------- configs


# ---------------------------------------------------------------- clips and features


@dataclass(frozen=True)
class Clips:
    """The files of a dataset and its split; `paths` order is the order of the cached rows."""

    root: Path  # the dataset's folder: paths are relative to it, and the cache lives in it
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    train: np.ndarray  # (N_train,) row indices
    test: np.ndarray  # (N_test,) row indices
    num_classes: int


def build_audio(clips: Clips, settings: LogMel) -> TensorData:
    x = torch.from_numpy(cached_features(clips, settings)).unsqueeze(1)  # (N, 1, M, T)
    y = torch.from_numpy(clips.labels)
    train_x, test_x = x[clips.train], x[clips.test]
    mean, std = _mean_std(train_x)
    for t in (train_x, test_x):
        t.sub_(mean).div_(std)
    return TensorData(
        train_x=train_x,
        train_y=y[clips.train],
        test_x=test_x,
        test_y=y[clips.test],
        num_classes=clips.num_classes,
    )


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all values, accumulated in float64 chunk by chunk."""
    total = squares = 0.0
    for chunk in x.split(4096):
        c = chunk.double()
        total += c.sum().item()
        squares += c.square().sum().item()
    n = x.numel()
    mean = total / n
    return mean, max(squares / n - mean * mean, 1e-12) ** 0.5


def cached_features(clips: Clips, settings: LogMel) -> np.ndarray:
    """Features (N, n_mels, frames) float32 of every clip: from the cache directory when
    there (kdaudit.data.cache), keyed by the files' names and sizes and the settings."""

    def compute():
        return {"x": compute_features([clips.root / p for p in clips.paths], settings)}

    return cached_arrays("audio", f"features-{_cache_key(clips, settings)}", compute)["x"]


def _cache_key(clips: Clips, settings: LogMel) -> str:
    sizes = [(clips.root / p).stat().st_size for p in clips.paths]
    manifest = {
        "version": FEATURES_VERSION,
        "features": asdict(settings),
        "files": list(zip(clips.paths, sizes, strict=True)),
    }
    return hashlib.sha256(json.dumps(manifest).encode()).hexdigest()[:16]


def compute_features(paths: list[Path], settings: LogMel) -> np.ndarray:
    """Read, resample, pad and transform every file, CHUNK clips per batch."""
    from rich.progress import Progress

    out = np.empty((len(paths), settings.n_mels, settings.n_frames), dtype=np.float32)
    with Progress(transient=True) as progress:
        task = progress.add_task("audio features", total=len(paths))
        for start in range(0, len(paths), CHUNK):
            batch = paths[start : start + CHUNK]
            waves = torch.from_numpy(np.stack([_load(p, settings) for p in batch]))  # (B, L)
            out[start : start + len(batch)] = log_mel(waves, settings).numpy()
            progress.advance(task, len(batch))
    return out


def _load(path: Path, settings: LogMel) -> np.ndarray:
    try:
        return load_clip(path, settings)
    except (ValueError, OSError, EOFError, struct.error) as err:
        raise DatasetMissing(
            f"{path} is not a readable wav file ({err}); replace it with the original"
        ) from err


# ---------------------------------------------------------------- file checks and downloads


def _missing(dataset: str, what: str, how: str, data_dir: Path) -> DatasetMissing:
    return DatasetMissing(
        f"{dataset}: {what}. {how} Put the files there, or point --data-dir (or $KDAUDIT_DATA) "
        f"at the folder that holds them (now: {data_dir})."
    )


def _examples(names, k: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(str(n) for n in names[:k]) + more


def _download_and_extract(
    data_dir: Path,
    archive: Resource,
    dest: Path,
    strip: str,
    dataset: str,
    how: str,
    download: bool,
) -> None:
    """Fetch `archive` (unless already there; checksum-verified) and unpack it into `dest`,
    via a temporary folder renamed at the end so that a broken unpack leaves no `dest`."""
    (path,) = ensure(data_dir, [archive], dataset, how, download)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    _extract(path, tmp, strip)
    os.replace(tmp, dest)


def _extract(archive: Path, dest: Path, strip: str) -> None:
    """Unpack a tar archive, dropping the leading folder `strip` from member names."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive) as tar:
        for member in tar:  # one pass over the (gzip) stream
            parts = PurePosixPath(member.name).parts  # "./a/b" -> ("a", "b")
            if strip:
                if parts[:1] != (strip,):
                    continue
                parts = parts[1:]
            if not parts or ".." in parts or parts[0].startswith("/"):
                continue
            member.name = "/".join(parts)
            tar.extract(member, dest, **safe)


# ---------------------------------------------------------------- FSDD


FSDD_HOW = (
    "The Free Spoken Digit Dataset's wav files are the recordings/ folder of "
    "https://github.com/Jakobovski/free-spoken-digit-dataset."
)


def build_fsdd(cfg: FSDDConfig, data_dir: Path) -> TensorData:
    """Spoken digits 0-9 (8 kHz recordings); official split: file index 0-4 test, 5-49 train."""
    return build_audio(fsdd_clips(cfg, Path(data_dir)), cfg.features())


def fsdd_clips(cfg: FSDDConfig, data_dir: Path) -> Clips:
    root = data_dir / "fsdd"
    folder = root / "recordings"
    names = sorted(p.name for p in folder.glob("*.wav") if not p.name.startswith("."))
    if not names:
        raise _missing("fsdd", f"no wav files in {folder}", FSDD_HOW, data_dir)
    matches = [FSDD_NAME.fullmatch(n) for n in names]
    odd = [n for n, m in zip(names, matches, strict=True) if m is None]
    if odd:
        raise DatasetMissing(
            f"fsdd: {len(odd)} files in {folder} are not named "
            f"{{digit}}_{{speaker}}_{{index}}.wav: {_examples(odd)}; remove them"
        )
    if cfg.n_files is not None and len(names) != cfg.n_files:
        raise _missing(
            "fsdd", _count_problem(folder, names, matches, cfg.n_files), FSDD_HOW, data_dir
        )
    labels = np.array([int(m[1]) for m in matches], dtype=np.int64)
    is_test = np.array([int(m[3]) < 5 for m in matches])
    paths = [f"recordings/{n}" for n in names]
    return Clips(root, paths, labels, np.flatnonzero(~is_test), np.flatnonzero(is_test), 10)


def _count_problem(folder: Path, names: list[str], matches, expected: int) -> str:
    speakers = sorted({m[2] for m in matches})
    full = {f"{d}_{s}_{i}.wav" for d in range(10) for s in speakers for i in range(50)}
    absent = full - set(names)
    hint = f" (absent: {_examples(absent)})" if absent else ""
    return (
        f"{folder} holds {len(names)} recordings, expected {expected}{hint}; "
        "set data.n_files to the number you mean to use (null: any)"
    )


# ---------------------------------------------------------------- Speech Commands v2


def build_speechcommands(cfg: SpeechCommandsConfig, data_dir: Path) -> TensorData:
    """35 words (1 s, 16 kHz); test = testing_list.txt, train = files in neither list, plus
    validation_list.txt's files when data.validation is 'train'."""
    return build_audio(speechcommands_clips(cfg, Path(data_dir)), cfg.features())


def speechcommands_clips(cfg: SpeechCommandsConfig, data_dir: Path) -> Clips:
    root = data_dir / "speechcommands"
    how = (
        f"Speech Commands v0.02 is {SPEECH_COMMANDS.url} (2.4 GB), extracted so that "
        f"{root}/<word>/ holds the wav files next to validation_list.txt and testing_list.txt."
    )
    if not root.exists():
        _download_and_extract(
            data_dir, SPEECH_COMMANDS, root, "", "speechcommands", how, cfg.download
        )
    lists = [root / "validation_list.txt", root / "testing_list.txt"]
    absent = [p for p in [*lists, *(root / w for w in WORDS)] if not p.exists()]
    if absent:
        raise _missing("speechcommands", f"missing {_examples(absent)}", how, data_dir)
    paths, labels = [], []
    for label, word in enumerate(WORDS):
        names = sorted(p.name for p in (root / word).glob("*.wav") if not p.name.startswith("."))
        paths += [f"{word}/{n}" for n in names]
        labels += [label] * len(names)
    validation, testing = (
        {line.strip() for line in p.read_text().splitlines() if line.strip()} for p in lists
    )
    unlisted = (validation | testing) - set(paths)
    if unlisted:
        raise _missing(
            "speechcommands",
            f"{len(unlisted)} files named in the lists are absent ({_examples(unlisted)})",
            how,
            data_dir,
        )
    is_test = np.array([p in testing for p in paths])
    is_val = np.array([p in validation for p in paths])
    train = np.flatnonzero(~is_test & ~is_val if cfg.validation == "drop" else ~is_test)
    labels = np.array(labels, dtype=np.int64)
    return Clips(root, paths, labels, train, np.flatnonzero(is_test), len(WORDS))


# ---------------------------------------------------------------- UrbanSound8K


def build_urbansound8k(cfg: UrbanSound8KConfig, data_dir: Path) -> TensorData:
    """10 urban sound classes (slices up to 4 s, assorted rates and formats); test = a seeded
    random test_size fraction per class (or the official folds in data.test_folds)."""
    return build_audio(urbansound8k_clips(cfg, Path(data_dir)), cfg.features())


def urbansound8k_clips(cfg: UrbanSound8KConfig, data_dir: Path) -> Clips:
    root = data_dir / "urbansound8k"
    how = (
        f"UrbanSound8K is {URBANSOUND8K.url} (6 GB, CC BY-NC; also "
        "https://urbansounddataset.weebly.com/urbansound8k.html), extracted so that "
        f"{root} holds audio/fold1..10/ and metadata/UrbanSound8K.csv."
    )
    if not root.exists():
        _download_and_extract(
            data_dir, URBANSOUND8K, root, "UrbanSound8K", "urbansound8k", how, cfg.download
        )
    table = root / "metadata" / "UrbanSound8K.csv"
    if not table.is_file():
        raise _missing("urbansound8k", f"missing {table}", how, data_dir)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [f"audio/fold{r['fold']}/{r['slice_file_name']}" for r in rows]
    absent = [p for p in paths if not (root / p).is_file()]
    if absent:
        raise _missing(
            "urbansound8k",
            f"{len(absent)} of the {len(paths)} slices in {table} "
            f"are missing under {root} ({_examples(absent)})",
            how,
            data_dir,
        )
    labels = np.array([int(r["classID"]) for r in rows], dtype=np.int64)
    if cfg.test_folds:
        is_test = np.array([int(r["fold"]) in cfg.test_folds for r in rows])
    else:
        is_test = split_test(labels, cfg.test_size, cfg.split_seed, cfg.stratify)
    return Clips(root, paths, labels, np.flatnonzero(~is_test), np.flatnonzero(is_test), 10)


def split_test(labels: np.ndarray, test_size: float, seed: int, stratify: bool) -> np.ndarray:
    """Test-set mask (N,): a seeded permutation of each class (or of all rows, unstratified)
    whose first round(test_size * n) members go to the test set. Not sklearn's exact draw."""
    rng = np.random.default_rng(seed)
    groups = (
        [np.flatnonzero(labels == c) for c in np.unique(labels)]
        if stratify
        else [np.arange(len(labels))]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    for rows in groups:
        is_test[rng.permutation(rows)[: int(test_size * len(rows) + 0.5)]] = True
    return is_test
