"""Wall time of a whole audit grid: kdaudit's engine against a plain PyTorch loop, same run.

    python benchmarks/grid_time.py [--config configs/mnist1d.yaml] [--students N]
        [--stack N] [--sequential | --no-plain] [--device cpu|cuda] [--set key=value]...

Both sides train every run of the grid (teachers, then students) on --device (CPU: one torch
thread), from the same seeds, data and hyperparameters, and compute the same test metrics.
The engine side is `run_grid` into a fresh store (stacked with --stack N; --sequential adds
a side with --stack 1). The plain side is benchmarks/plain_loop.py (vector and image data);
--no-plain leaves it out and compares --stack N with --stack 1 instead (any modality, text
included). The results must agree: per condition, the mean test accuracy and functional
metrics within TOLERANCE. The ratios against the reference side are printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plain_loop import plain_logits, train_plain  # noqa: E402
from kdaudit.config import load_config  # noqa: E402
from kdaudit.data import load_data  # noqa: E402
from kdaudit.executors import ExecutorConfig, run_grid  # noqa: E402
from kdaudit.metrics import accuracy_and_loss, functional_similarity  # noqa: E402
from kdaudit.protocol import expand  # noqa: E402
from kdaudit.store import RunStore  # noqa: E402

METRICS = ("test_accuracy", "activation_distance", "js_divergence", "prediction_disagreement")
# Per-condition means of two equally valid trainings that differ by rounding (fused vs plain
# Adam, cached vs recomputed teacher logits) and so diverge a little over the epochs.
TOLERANCE = 0.01


def engine_side(cfg, stack: int, device: str = "cpu") -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(prefix="kdaudit-grid-"))
    start = time.perf_counter()
    outcome = run_grid(cfg, out, ExecutorConfig(stack=stack), device)
    seconds = time.perf_counter() - start
    if outcome.failed:
        raise RuntimeError(f"engine runs failed: {outcome.failed}")
    store = RunStore(out)
    rows = {}
    for spec in expand(cfg).runs:
        record = store.record(spec.run_id)
        rows[spec.label] = {"test_accuracy": record["metrics"]["test_accuracy"],
                            **record.get("similarity", {})}  # fmt: skip
    return seconds, rows


def plain_side(cfg, device: str = "cpu") -> tuple[float, dict]:
    data = load_data(cfg.data)
    labels = data.test_y
    start = time.perf_counter()
    teachers, rows = {}, {}
    for spec in expand(cfg).runs:
        teacher = teachers.get(spec.teacher_id)
        model, _losses = train_plain(spec, data, teacher[0] if teacher else None, device)
        logits = plain_logits(model, data.test_x)  # (N_test, K)
        row = {"test_accuracy": accuracy_and_loss(logits, labels)[0]}
        if spec.is_teacher:
            teachers[spec.run_id] = (model.eval(), logits)
        else:
            row.update(functional_similarity(teacher[1], logits, labels))
        rows[spec.label] = row
    return time.perf_counter() - start, rows


def by_condition(rows: dict) -> dict:
    """label -> row, to (condition setting) -> metric -> mean over student seeds."""
    groups = defaultdict(list)
    for label, row in rows.items():
        groups[label.rsplit("_s", 1)[0] if "_s" in label else label].append(row)
    return {
        g: {m: float(np.mean([r[m] for r in rs if m in r])) for m in METRICS if m in rs[0]}
        for g, rs in groups.items()
    }


def agreement(a: dict, b: dict) -> float:
    """The largest difference of a per-condition mean between two sides."""
    ma, mb = by_condition(a), by_condition(b)
    return max(abs(ma[g][m] - mb[g][m]) for g in ma for m in ma[g])


def shrunk(cfg, students: int | None):
    if students is None:
        return cfg
    seeds = cfg.protocol.student_seeds[:students]
    return replace(cfg, protocol=replace(cfg.protocol, student_seeds=seeds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/mnist1d.yaml")
    p.add_argument("--students", type=int, help="keep the first N student seeds (shrink)")
    p.add_argument("--stack", type=int, default=16, help="engine --stack (default 16)")
    p.add_argument("--sequential", action="store_true", help="also time the engine, --stack 1")
    p.add_argument("--no-plain", action="store_true",
                   help="no plain loop: compare --stack N with --stack 1 (any modality)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = shrunk(load_config(args.config, args.overrides), args.students)
    n_runs = len(expand(cfg).runs)
    load_data(cfg.data)  # generated/cached once, outside both timings
    print(f"grid {cfg.name}: {n_runs} runs; load average {os.getloadavg()[0]:.2f} at start")
    reference = "engine --stack 1" if args.no_plain else "plain loop"
    sides = {} if args.no_plain else {"plain loop": plain_side(cfg, args.device)}
    sides[f"engine --stack {args.stack}"] = engine_side(cfg, args.stack, args.device)
    if args.sequential or args.no_plain:
        sides["engine --stack 1"] = engine_side(cfg, 1, args.device)
    ref_s, ref_rows = sides[reference]
    for name, (seconds, rows) in sides.items():
        diff = agreement(ref_rows, rows)
        print(f"{name:18s} {seconds:8.1f} s  {seconds / n_runs:6.2f} s/run  "
              f"max |mean diff| vs {reference} {diff:.4f}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    worst = max(agreement(ref_rows, rows) for _, rows in sides.values())
    print(f"results agree within {TOLERANCE}: {'yes' if worst <= TOLERANCE else 'NO'}")
    for name, (seconds, _) in sides.items():
        if name != reference:
            print(f"ratio {reference} / {name}: {ref_s / seconds:.2f}x")


if __name__ == "__main__":
    main()
