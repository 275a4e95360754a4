"""Time and peak memory of `kdaudit compare` on synthetic language-model logits.

    python benchmarks/compare_bench.py [--n 20000] [--k 32000] [--students kd,siddo] [--keep]

Writes fp32 .npy logits of shape (N, K) for a teacher and each student (2.56 GB each at the
defaults) plus int64 labels into a temporary folder, runs `kdaudit compare` on them in a
subprocess twice (the second run reads the metrics cache), and prints each run's wall time
and peak resident memory (ru_maxrss of the child, from os.wait4). Students are the teacher
plus Gaussian noise, kd closer to it than the controls; each condition has one seed, so the
paired tests have n=1: enough to exercise the whole path, not a meaningful verdict.

The files are written by a separate process: on Linux a child's ru_maxrss starts from its
parent's high-water mark at fork/exec, so a parent that had just written 7.7 GB through
np.memmap made every child report about 7.5 GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS_PER_BLOCK = 1024
NOISE = {"kd": 1.0, "siddo": 2.0, "rcd": 1.9, "ls": 1.9}  # logit noise around the teacher


def write_logits(folder: Path, n: int, k: int, students: list[str], seed: int = 0) -> Path:
    """Teacher, students and labels as .npy files, block by block; returns the manifest."""
    rng = np.random.default_rng(seed)
    names = ["teacher", *students]
    arrays = {
        name: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", np.float32, (n, k))
        for name in names
    }
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, ROWS_PER_BLOCK):
        rows = min(ROWS_PER_BLOCK, n - start)
        teacher = rng.standard_normal((rows, k), dtype=np.float32)
        teacher *= 3.0
        arrays["teacher"][start : start + rows] = teacher
        for name in students:
            noisy = rng.standard_normal((rows, k), dtype=np.float32)
            noisy *= NOISE[name]
            noisy += teacher
            arrays[name][start : start + rows] = noisy
        right = teacher.argmax(axis=1)
        wrong = rng.integers(0, k, rows)
        labels[start : start + rows] = np.where(rng.random(rows) < 0.7, right, wrong)
    for array in arrays.values():
        array.flush()
    np.save(folder / "labels.npy", labels)
    return write_manifest(folder, students)


def write_manifest(folder: Path, students: list[str]) -> Path:
    lines = ["role,alpha,temperature,seed,teacher_seed,path", "labels,,,,,labels.npy"]
    lines.append("teacher,,,0,,teacher.npy")
    settings = {"kd": "0.5,1", "rcd": "0.5,1", "ls": "0.5,", "siddo": ","}
    lines += [f"{name},{settings[name]},10,0,{name}.npy" for name in students]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_compare(manifest: Path, out: Path) -> dict:
    """Wall time, CPU time and peak RSS (MiB) of one `kdaudit compare` subprocess."""
    command = [sys.executable, "-m", "kdaudit.cli", "compare", str(manifest), "--out", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code  # reaped by wait4, so Popen must not wait again
    if code != 0:
        raise SystemExit(f"kdaudit compare failed (exit {code}):\n{output}")
    cpu = usage.ru_utime + usage.ru_stime  # all threads; compare with wall under shared load
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024, "output": output}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="positions (examples)")
    p.add_argument("--k", type=int, default=32_000, help="vocabulary size")
    p.add_argument("--students", default="kd,siddo", help="comma-separated conditions")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the logits files")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    students = args.students.split(",")
    if args.write_only:  # the child process that writes the files
        write_logits(args.dir, args.n, args.k, students)
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="kdaudit-compare-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    needed = (1 + len(students)) * args.n * args.k * 4
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, need {needed / 1e9:.1f} GB")
    try:
        bench(folder, args)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def bench(folder: Path, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    writer = [sys.executable, __file__, "--write-only", "--dir", str(folder), "--n", str(args.n),
              "--k", str(args.k), "--students", args.students]  # fmt: skip
    subprocess.run(writer, check=True)
    manifest = folder / "manifest.csv"
    size = sum(f.stat().st_size for f in folder.glob("*.npy")) / 1e9
    print(f"wrote {1 + len(args.students.split(','))} x ({args.n}, {args.k}) fp32 logits "
          f"({size:.2f} GB) in {time.perf_counter() - start:.0f} s to {folder}")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load average before: {_load()}", flush=True)
    for label in ("first run", "rerun (cache)"):
        result = run_compare(manifest, folder / "out")
        print(f"{label}: wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB, load average after: {_load()}", flush=True)  # fmt: skip
    print("\nlast run's output:\n" + result["output"])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
