"""Dataset files: checksums, downloads with progress, and errors that say what to do."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class DatasetMissing(FileNotFoundError):
    """Files of a dataset are absent or damaged; the message names them and the fix."""


@dataclass(frozen=True)
class Resource:
    """One file of a dataset: where it goes (relative to the data directory), its checksum."""

    path: str  # e.g. "svhn/train_32x32.mat"
    url: str | None = None  # None: the source allows no direct download
    sha256: str | None = None
    md5: str | None = None  # where the source publishes only an MD5


def checksum_ok(path: Path, resource: Resource) -> bool:
    if resource.sha256:
        return _digest(path, "sha256") == resource.sha256
    if resource.md5:
        return _digest(path, "md5") == resource.md5
    return True


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure(
    data_dir: Path, resources: list[Resource], dataset: str, how: str, download: bool = True
) -> list[Path]:
    """Paths of the resources, downloading missing ones where a URL is known; otherwise a
    DatasetMissing error naming the files, where to put them and where to get them.
    `how` tells the user where the files come from (a sentence)."""
    missing = []
    for r in resources:
        path = data_dir / r.path
        if not path.is_file() and r.url and download:
            fetch(r, path)
        if not path.is_file():
            missing.append(path)
        elif not checksum_ok(path, r):
            raise DatasetMissing(
                f"{dataset}: {path} is damaged (checksum mismatch); delete it and run again "
                "to download it anew, or replace it with the original file"
            )
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise DatasetMissing(
            f"{dataset}: missing {names}. {how} Put the files there, or point --data-dir "
            f"(or $KDAUDIT_DATA) at the folder that holds them (now: {data_dir})."
        )
    return [data_dir / r.path for r in resources]


def fetch(resource: Resource, path: Path) -> None:
    """Download to a temporary name with a progress bar, verify, then rename into place."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        with urllib.request.urlopen(resource.url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task(f"download {path.name}", total=total)
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    progress.advance(task, len(block))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DatasetMissing(
            f"could not download {resource.url} ({err}); download it by hand to {path}"
        ) from err
    if not checksum_ok(tmp, resource):
        tmp.unlink()
        raise DatasetMissing(f"the download of {resource.url} has the wrong checksum; try again")
    shutil.move(tmp, path)
