"""Time and memory of kdaudit.metrics.functional_similarity on synthetic logits.

    python benchmarks/metrics_bench.py [--n 1000000] [--k 65] [--chunk-sizes 1024,4096,65536]

Each chunk size runs in its own subprocess, because ru_maxrss is a per-process high-water
mark: a shared process would report the largest chunk's peak for every later one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from kdaudit.metrics import DEFAULT_CHUNK_SIZE, functional_similarity


def synthetic_pair(n: int, k: int, seed: int = 0):
    """Teacher logits, model = teacher + noise (both (n, k) float32), labels (n,) int64."""
    rng = np.random.default_rng(seed)
    # In-place arithmetic keeps the baseline RSS at the two arrays, so the reported
    # increase shows the function's own working memory.
    teacher = rng.standard_normal((n, k), dtype=np.float32)
    teacher *= 3.0
    model = rng.standard_normal((n, k), dtype=np.float32)
    model *= 1.5
    model += teacher
    labels = teacher.argmax(axis=1)
    flip = rng.random(n) < 0.2  # teacher wrong on ~20% of examples
    labels[flip] = rng.integers(0, k, flip.sum())
    return torch.from_numpy(teacher), torch.from_numpy(model), torch.from_numpy(labels)


def max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_one(n: int, k: int, chunk_size: int, repeats: int) -> dict:
    teacher, model, labels = synthetic_pair(n, k)
    rss_before = max_rss_mib()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = functional_similarity(teacher, model, labels, chunk_size=chunk_size)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if times[-1] > 60:  # slow: one run is enough
            break
    return {
        "chunk_size": chunk_size,
        "best_s": min(times),
        "cpu_s": cpu_times[times.index(min(times))],  # CPU seconds of the best run, all threads
        "runs": len(times),
        "rss_before_mib": rss_before,
        "rss_after_mib": max_rss_mib(),
        "js_divergence": result["js_divergence"],
    }


def run_in_subprocess(args: argparse.Namespace, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--n", str(args.n), "--k", str(args.k)]
    cmd += ["--repeats", str(args.repeats), "--single", str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"functional_similarity on N={args.n:,} x K={args.k} float32 logits (pair)")
    print(
        f"cpus={os.cpu_count()} torch threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(
        f"{'chunk_size':>10} {'best_s':>8} {'cpu_s':>7} {'runs':>4} {'rss_before':>11} {'rss_after':>10} {'delta':>8}"
    )
    for r in rows:
        delta = r["rss_after_mib"] - r["rss_before_mib"]
        print(
            f"{r['chunk_size']:>10} {r['best_s']:>8.2f} {r['cpu_s']:>7.2f} {r['runs']:>4} "
            f"{r['rss_before_mib']:>8.0f}MiB {r['rss_after_mib']:>7.0f}MiB {delta:>5.0f}MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-sizes", default=f"1024,{DEFAULT_CHUNK_SIZE},16384,65536")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single is not None:
        print(json.dumps(time_one(args.n, args.k, args.single, args.repeats)))
        return
    sizes = [int(s) for s in args.chunk_sizes.split(",")]
    print_table(args, [run_in_subprocess(args, s) for s in sizes])


if __name__ == "__main__":
    main()
