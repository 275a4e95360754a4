"""Peak memory and time of `kdaudit compare` on top-k files of many tokens.

    python benchmarks/topk_memory.py [--n 10000000] [--k 20] [--vocab 32000]
        [--students kd,siddo,rcd] [--also 1000000] [--dir DIR] [--keep]

Writes a teacher's and the students' (default kd, siddo, rcd) top-k files, `topk_ids` int32 and
`topk_logprobs` fp32 of shape (N, k) in stored .npz files (1.6 GB each at the defaults)
plus int64 labels, runs `kdaudit compare` on them in a subprocess and prints its wall time
and peak resident memory (ru_maxrss of the child; the files are written by another child,
see compare_bench.py). `--also N2` first does the same at N2 tokens: if the compare
streams, its peak grows with N only by the labels (8 bytes a token, read whole) and not by
the files (160 bytes a token per model at k = 20).

Synthetic rows: the teacher's ids are k distinct classes spaced by a per-row random stride,
a student's the same run of classes shifted by 0-5 places (overlap k-5 to k); log-probs are
a random softmax over k + 1 logits of which the last is the tail; labels are the teacher's
top-1 half of the time. Each condition has one seed (n = 1 per test): the verdict is
meaningless; the path and its memory are what is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from compare_bench import run_compare  # benchmarks/ is on sys.path when run as a script

BLOCK = 1 << 20  # rows generated at a time
SHIFT = {"teacher": 0, "kd": 1, "siddo": 4, "rcd": 5}  # most places a student's ids shift
SETTINGS = {"teacher": ",,0,", "kd": "0.5,1,10,0", "siddo": ",,10,0", "rcd": "0.5,1,10,0"}


def write_files(folder: Path, n: int, k: int, vocab: int, students: list[str]) -> None:
    """Every model's .npz (members written as .npy memmaps, then stored in the zip)."""
    rng = np.random.default_rng(0)
    stride_max = vocab // (k + 6)  # k + 5 consecutive multiples stay distinct mod vocab
    arrays = {}
    for name in ["teacher", *students]:
        ids = np.lib.format.open_memmap(folder / f"{name}_ids.npy", "w+", np.int32, (n, k))
        lp = np.lib.format.open_memmap(folder / f"{name}_lp.npy", "w+", np.float32, (n, k))
        arrays[name] = (ids, lp)
    labels = np.lib.format.open_memmap(folder / "labels.npy", "w+", np.int64, (n,))
    for start in range(0, n, BLOCK):
        rows = min(BLOCK, n - start)
        offset = rng.integers(0, vocab, (rows, 1))
        stride = rng.integers(1, stride_max, (rows, 1))
        for name, (ids, lp) in arrays.items():
            shift = rng.integers(0, SHIFT[name] + 1, (rows, 1))
            ids[start : start + rows] = (offset + (np.arange(k) + shift) * stride) % vocab
            logits = rng.standard_normal((rows, k + 1)) * 2.0
            logits -= np.logaddexp.reduce(logits, axis=1, keepdims=True)
            lp[start : start + rows] = logits[:, :k]  # the last of k + 1 is the tail
        teacher_top = ids_of(arrays["teacher"], start, rows)
        labels[start : start + rows] = np.where(
            rng.random(rows) < 0.5, teacher_top, rng.integers(0, vocab, rows)
        )
    np.save(folder / "vocab.npy", np.array(vocab))
    for name, (ids, lp) in arrays.items():
        ids.flush()
        lp.flush()
        with zipfile.ZipFile(folder / f"{name}.npz", "w", zipfile.ZIP_STORED) as z:
            z.write(folder / f"{name}_ids.npy", "topk_ids.npy")
            z.write(folder / f"{name}_lp.npy", "topk_logprobs.npy")
            z.write(folder / "vocab.npy", "vocab_size.npy")
        (folder / f"{name}_ids.npy").unlink()
        (folder / f"{name}_lp.npy").unlink()
    labels.flush()
    lines = ["role,alpha,temperature,seed,teacher_seed,path", "labels,,,,,labels.npy"]
    lines += [f"{name},{SETTINGS[name]},{name}.npz" for name in arrays]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def ids_of(pair, start: int, rows: int) -> np.ndarray:
    """The top-1 class of each row: the id of the largest log-prob."""
    ids, lp = pair
    block = np.asarray(lp[start : start + rows])
    return np.take_along_axis(np.asarray(ids[start : start + rows]),
                              block.argmax(axis=1)[:, None], axis=1)[:, 0]  # fmt: skip


def measure(n: int, args: argparse.Namespace) -> None:
    folder = Path(args.dir or tempfile.mkdtemp(prefix="kdaudit-topk-memory-")) / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    models = 1 + len(args.students.split(","))
    needed = models * n * args.k * 8 * 2 + n * 8  # the .npy members and their zip copy
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, need {needed / 1e9:.1f} GB")
    try:
        start = time.perf_counter()
        writer = [sys.executable, __file__, "--write-only", "--dir", str(folder), "--n", str(n),
                  "--k", str(args.k), "--vocab", str(args.vocab), "--students", args.students]  # fmt: skip
        subprocess.run(writer, check=True)
        size = sum(f.stat().st_size for f in folder.glob("*.npz")) / 1e9
        print(f"N={n:,}: wrote {models} top-{args.k} files ({size:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s; load average {_load()}", flush=True)  # fmt: skip
        result = run_compare(folder / "manifest.csv", folder / "out")
        print(f"N={n:,}: compare wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s, "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB; load average after {_load()}",
              flush=True)  # fmt: skip
        print("  " + "\n  ".join(line for line in result["output"].splitlines() if "top-k" in line))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000, help="tokens (positions)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--students", default="kd,siddo,rcd", help="comma-separated conditions")
    p.add_argument("--also", type=int, default=1_000_000, help="a smaller N measured first")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_only:  # the child process that writes the files
        write_files(args.dir, args.n, args.k, args.vocab, args.students.split(","))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {_load()}")
    for n in ([args.also] if args.also else []) + [args.n]:
        measure(n, args)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
