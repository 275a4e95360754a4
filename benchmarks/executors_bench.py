"""The same audit with each executor: wall time, ratio to sequential, identical results.

    python benchmarks/executors_bench.py [--config configs/mnist1d.yaml] [--set k=v]...
        [--workers 2] [--executors sequential,workers,ray] [--out DIR]

Each executor runs the whole grid into a fresh directory as one `kdaudit run` child process
(`--device cpu`), timed from outside: interpreter start, the grid, and the report, which is
the same work for every executor. Then every run's stored test logits are compared across
executors, bit for bit, as are its stored metrics. The 1-minute load average is printed
before and after each executor: other processes on the machine slow everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLAGS = {
    "sequential": ["--workers", "1"],
    "workers": ["--workers", "{workers}"],
    "ray": ["--executor", "ray", "--workers", "{workers}"],
}


def run(name: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "kdaudit.cli", "run", args.config, "--out", str(out),
           "--device", "cpu"]  # fmt: skip
    cmd += [f.format(workers=args.workers) for f in FLAGS[name]]
    for item in args.overrides:
        cmd += ["--set", item]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"executor": name, "wall": wall, "exit": proc.returncode,
            "load_before": load_before, "load_after": os.getloadavg()[0]}  # fmt: skip


def compare(dirs: dict[str, Path]) -> tuple[int, int, float]:
    """(runs identical in every directory, runs compared, largest logit difference)."""
    names = list(dirs)
    first = dirs[names[0]] / "runs"
    run_ids = sorted(p.name for p in first.iterdir() if not p.name.startswith("."))
    same, worst = 0, 0.0
    for run_id in run_ids:
        ref = np.load(first / run_id / "test_logits.npy")
        ref_record = _scores(first / run_id)
        equal = True
        for name in names[1:]:
            other = dirs[name] / "runs" / run_id
            if not (other / "test_logits.npy").is_file():
                equal = False
                continue
            logits = np.load(other / "test_logits.npy")
            worst = max(worst, float(np.abs(logits - ref).max()))
            equal &= np.array_equal(logits, ref) and _scores(other) == ref_record
        same += equal
    return same, len(run_ids), worst


def _scores(run_dir: Path) -> tuple:
    record = json.loads((run_dir / "record.json").read_text())
    return record["metrics"], record.get("similarity")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mnist1d.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--executors", default="sequential,workers,ray")
    p.add_argument("--out", type=Path, help="parent of the run directories (default: temporary)")
    args = p.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="kdaudit-executors-"))
    print(f"{os.cpu_count()} CPUs; config {args.config} {' '.join(args.overrides)}")
    rows, dirs = [], {}
    for name in args.executors.split(","):
        dirs[name] = base / name
        shutil.rmtree(dirs[name], ignore_errors=True)
        rows.append(run(name, args, dirs[name]))
        r = rows[-1]
        print(f"  {name:10s} done in {r['wall']:.1f} s (exit {r['exit']})", flush=True)
    base_wall = next((r["wall"] for r in rows if r["executor"] == "sequential"), rows[0]["wall"])
    label = {"workers": f"local --workers {args.workers}", "ray": f"ray --workers {args.workers}"}
    print(f"\n{'executor':22s} {'wall s':>8s} {'vs seq':>9s} {'load avg before/after':>22s}")
    for r in rows:
        name, ratio = label.get(r["executor"], r["executor"]), r["wall"] / base_wall
        load = f"{r['load_before']:.2f} / {r['load_after']:.2f}"
        print(f"{name:22s} {r['wall']:8.1f} {ratio:8.2f}x {load:>22s}")
    same, total, worst = compare(dirs)
    verdict = "identical" if same == total else "NOT identical"
    print(f"\nstored test logits and metrics: {verdict} across executors for {same}/{total} "
          f"runs (largest logit difference {worst:g})")  # fmt: skip
    print(f"runs in {base}")


if __name__ == "__main__":
    main()
