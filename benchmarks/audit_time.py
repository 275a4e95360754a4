"""Wall time and peak memory of the default audit: a fresh run, then a resumed (complete) one.

    python benchmarks/audit_time.py [--config configs/mnist1d.yaml] [--out DIR] [--set k=v]...

Each is a separate `kdaudit run` process, timed from outside; peak memory is the process's
maximum resident set size as the kernel accounts it (wait4).
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


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mnist1d.yaml")
    p.add_argument("--out", type=Path, help="run directory (default: a fresh temporary one)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kdaudit-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "kdaudit.cli",
        "run",
        args.config,
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    for item in args.overrides:
        cmd += ["--set", item]
    print(f"{'':8s} {'wall s':>9s} {'peak RSS MiB':>13s} exit")
    for label in ("fresh", "resumed"):
        wall, rss, code = timed(cmd)
        print(f"{label:8s} {wall:9.1f} {rss:13.0f} {code:4d}")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
