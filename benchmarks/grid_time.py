"""Wall time of a whole audit grid: kdaudit's engine against a plain PyTorch loop, same run.

    python benchmarks/grid_time.py [--config configs/mnist1d.yaml] [--students N]
        [--workers N] [--stack N] [--no-plain] [--side plain|engine] [--device cpu|cuda]
        [--set key=value]...

By default the engine side is what `kdaudit run` (and `make run`) does: `run_grid` with the
default executor, into a fresh store, so as many worker processes as the machine has cores
(one torch thread each) or GPUs. The plain side (benchmarks/plain_loop.py, vector and image
data) trains the same runs, teachers first, from the same seeds, data and hyperparameters,
in as many processes, one torch thread each. `--workers N` sets both; `--stack N` stacks
the engine's runs (one process, so one for the plain side too); `--no-plain` compares
`--stack N` with one run at a time instead (any modality, text included). `--side` runs one
side alone, for a whole-process timer that alternates the two on a noisy machine.

Both sides must agree: per condition, the mean test accuracy and functional metrics within
TOLERANCE. Each side's figure is its wall time, and the training FLOPs of the grid (counted
from the model: forward and backward of every step, evaluation not counted) over that time
as a fraction of the machine's peak, a large matmul on all cores (or the GPU) measured in
this run, before and after the sides (the higher is used). The ratios come last.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peak import cpu_count, machine_peak, training_flops  # noqa: E402
from benchmarks.plain_loop import plain_logits, train_plain  # noqa: E402
from kdaudit.config import load_config  # noqa: E402
from kdaudit.data import load_data  # noqa: E402
from kdaudit.engine.loop import total_steps  # noqa: E402
from kdaudit.executors import ExecutorConfig, run_grid  # noqa: E402
from kdaudit.executors.core import RunContext, resolve_device  # noqa: E402
from kdaudit.executors.local import local_workers  # noqa: E402
from kdaudit.metrics import accuracy_and_loss, functional_similarity  # noqa: E402
from kdaudit.models import build_model  # noqa: E402
from kdaudit.protocol import expand  # noqa: E402
from kdaudit.store import RunStore  # noqa: E402

METRICS = ("test_accuracy", "activation_distance", "js_divergence", "prediction_disagreement")
# Per-condition means of two equally valid trainings that differ by rounding (fused vs plain
# Adam, cached vs recomputed teacher logits) and so diverge a little over the epochs.
TOLERANCE = 0.01


def engine_side(cfg, options: ExecutorConfig, device: str) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(prefix="kdaudit-grid-"))
    start = time.perf_counter()
    outcome = run_grid(cfg, out, options, device)
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


def plain_side(cfg, device: str, processes: int) -> tuple[float, dict]:
    """Teachers, then their students, each run in one of `processes` processes."""
    grid, labels = expand(cfg), load_data(cfg.data).test_y
    start = time.perf_counter()
    with _pool(processes) as pool:
        teachers = {t.run_id: r for t, r in zip(grid.teachers, pool.map(
            _plain_run, [(cfg, t, None, device) for t in grid.teachers]), strict=True)}  # fmt: skip
        jobs = [(cfg, s, teachers[s.teacher_id][1], device) for s in grid.students]
        students = dict(zip(grid.students, pool.map(_plain_run, jobs), strict=True))
    seconds = time.perf_counter() - start
    rows = {t.label: {"test_accuracy": accuracy_and_loss(teachers[t.run_id][0], labels)[0]}
            for t in grid.teachers}  # fmt: skip
    for spec, (logits, _) in students.items():
        teacher_logits = teachers[spec.teacher_id][0]
        rows[spec.label] = {"test_accuracy": accuracy_and_loss(logits, labels)[0],
                            **functional_similarity(teacher_logits, logits, labels)}  # fmt: skip
    return seconds, rows


def _pool(processes: int):
    if processes == 1:  # in this process, as the engine's one worker runs there too
        return _Here()
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip


class _Here:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return [fn(job) for job in jobs]


_DATA: dict = {}


def _plain_run(job) -> tuple[torch.Tensor, dict | None]:
    """One run by hand: its test logits (N_test, K), and a teacher's weights (else None)."""
    cfg, spec, teacher_weights, device = job
    if cfg.data not in _DATA:
        _DATA[cfg.data] = load_data(cfg.data)
    data = _DATA[cfg.data]
    teacher = None
    if teacher_weights is not None:
        teacher_spec = next(t for t in expand(cfg).teachers if t.run_id == spec.teacher_id)
        teacher = build_model(teacher_spec.model, data.input_shape, data.num_classes, 0)
        teacher.load_state_dict(teacher_weights)
        teacher = teacher.to(device).eval()
    model, _losses = train_plain(spec, data, teacher, device)
    weights = {k: v.cpu() for k, v in model.state_dict().items()} if spec.is_teacher else None
    return plain_logits(model, data.test_x), weights


def one_side(side: str, cfg, options: ExecutorConfig, processes: int, device: str) -> None:
    if side == "plain":
        seconds, _ = plain_side(cfg, device, processes)
    else:
        seconds, _ = engine_side(cfg, options, device)
    print(f"{side}, {processes} processes: {seconds:.1f} s; load average {os.getloadavg()[0]:.2f}")


def grid_flops(cfg) -> float:
    """Training FLOPs of every run of the grid: forward and backward per example, counted by
    torch from the model's operators, times the examples each run trains on."""
    data, total, per_example = load_data(cfg.data), 0.0, {}
    for spec in expand(cfg).runs:
        b = spec.train.batch_size
        if spec.model not in per_example:
            model = build_model(spec.model, data.input_shape, data.num_classes, 0)
            batch = data.train_batch(torch.arange(b), spec.train.augment)[0]
            per_example[spec.model] = training_flops(model, batch) / b
        steps, per_epoch = total_steps(data.n_train, spec.train), -(-data.n_train // b)
        # whole epochs see every example; a partial epoch only whole batches
        examples = steps // per_epoch * data.n_train + steps % per_epoch * b
        total += per_example[spec.model] * examples
    return total


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
    p.add_argument("--workers", type=int, help="processes of each side (default: the engine's)")
    p.add_argument("--stack", type=int, default=1, help="engine --stack (default 1)")
    p.add_argument("--no-plain", action="store_true",
                   help="no plain loop: compare --stack N with --stack 1 (any modality)")  # fmt: skip
    p.add_argument("--side", choices=("plain", "engine"), help="run this side only")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = shrunk(load_config(args.config, args.overrides), args.students)
    grid = expand(cfg)
    load_data(cfg.data)  # generated/cached once, outside both timings
    options = ExecutorConfig(workers=args.workers, stack=args.stack)
    ctx = RunContext("", str(resolve_device(args.device)), 1, None, "")
    processes = local_workers(grid.runs, ctx, options)
    if args.side:
        one_side(args.side, cfg, options, processes, args.device)
        return
    flops = grid_flops(cfg)
    peaks = [machine_peak(args.device)]
    print(f"grid {cfg.name}: {len(grid.runs)} runs, {flops / 1e12:.2f} TFLOP of training "
          f"(counted from the model); load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    engine = f"engine, {processes} process{'es' if processes > 1 else ''}"
    engine += f", --stack {args.stack}" if args.stack > 1 else ""
    sides = {}
    if args.no_plain:
        reference = "engine --stack 1"
        sides[reference] = engine_side(cfg, ExecutorConfig(workers=1), args.device)
    else:
        reference = f"plain loop, {processes} process{'es' if processes > 1 else ''}"
        sides[reference] = plain_side(cfg, args.device, processes)
    sides[engine] = engine_side(cfg, options, args.device)
    peaks.append(machine_peak(args.device))
    peak = max(peaks)
    where = f"all {cpu_count()} cores" if args.device == "cpu" else args.device
    print(f"matmul peak ({where}), measured before and after: "
          f"{' and '.join(f'{x / 1e9:.0f}' for x in peaks)} GFLOP/s")  # fmt: skip
    ref_s, ref_rows = sides[reference]
    for name, (seconds, rows) in sides.items():
        rate = flops / seconds
        print(f"{name:32s} {seconds:8.1f} s  {rate / 1e9:6.1f} GFLOP/s  {rate / peak:5.1%} of "
              f"peak  max |mean diff| vs {reference}: {agreement(ref_rows, rows):.4f}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    worst = max(agreement(ref_rows, rows) for _, rows in sides.values())
    print(f"results agree within {TOLERANCE}: {'yes' if worst <= TOLERANCE else 'NO'}")
    for name, (seconds, _) in sides.items():
        if name != reference:
            print(f"ratio {reference} / {name}: {ref_s / seconds:.2f}x; {name}: "
                  f"{flops / seconds / peak:.0%} of the machine's matmul peak")  # fmt: skip


if __name__ == "__main__":
    main()
