"""What the machine can do, measured in the same run as a benchmark: the FLOP rate of a large
fp32 matrix multiply (CPU: all cores, or one thread; GPU: the device), and the training FLOPs
of a model counted from the model itself (torch's FlopCounterMode over a forward and
backward pass), so that a benchmark can print the fraction of that peak it achieved.

    python benchmarks/peak.py    # the peak of all cores, and of one thread
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: str = "cpu", threads: int | None = None, size: int = 1024,
                seconds: float = 2.0, dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """FLOP/s of the fastest of repeated (size x size) @ (size x size) multiplies over about
    `seconds`; on the CPU with `threads` torch threads (None: one per core). The default
    size takes tens of milliseconds on one core, short enough that on a busy machine some
    multiply runs undisturbed, as a benchmark's shortest timings do; even so, a peak taken
    while others load the machine is low, and a fraction of it can exceed 100%."""
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads or cpu_count())
    try:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best, end = float("inf"), time.perf_counter() + seconds
        a @ b  # warm-up: thread pool, kernel choice
        while time.perf_counter() < end:
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best
    finally:
        torch.set_num_threads(before)


def machine_peak(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The whole machine's matmul FLOP/s: every core (CPU) or the device (GPU)."""
    return matmul_peak(device, size=8192 if device != "cpu" else 2048, dtype=dtype)


def training_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one training step's forward and backward pass of `model` on the batch `x`
    (counted by torch from the operators it runs: matrix multiplies and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"matmul peak, all {cpu_count()} cores: {machine_peak() / 1e9:.0f} GFLOP/s")
    print(f"matmul peak, one thread: {matmul_peak(threads=1) / 1e9:.0f} GFLOP/s")
