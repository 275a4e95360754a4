"""Where a training step's time goes: the engine's step against the arithmetic in it.

    python benchmarks/profile_step.py [--model mlp|cnn|resnet18|audio_cnn|nanogpt]
        [--device cpu|cuda] [--steps N] [--stack K] [--gpu-scale] [--rows N]
        [--precision bf16] [--channels-last] [--compile]

Trains the model of benchmarks/throughput.py (synthetic data of its modality's shape, KD
from cached teacher logits; the default, mlp, is the default audit's MLP 40-256-256-10 at
batch 128) as an executor runs it (CPU: one torch thread). First, without the profiler: the
time per step (fastest of three), the step's FLOPs counted from the model, the rate this
achieves and its fraction of the peak of a large matmul measured now (one thread on the
CPU, as one run gets; the device on a GPU). Then torch.profiler over `--steps` steps: the
operators that took the most self time, and the shares of matrix multiplies (the
arithmetic), backward, optimizer, and forward, loss and batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peak import matmul_peak, training_flops  # noqa: E402
from benchmarks.throughput import _model_and_objective, cases, synthetic  # noqa: E402
from kdaudit.config import TrainConfig  # noqa: E402
from kdaudit.engine.loop import train  # noqa: E402
from kdaudit.engine.stacking import Member, train_stacked  # noqa: E402


def run(case, data, cfg: TrainConfig, stack: int) -> None:
    if stack > 1:  # one data seed: the paired runs of one student seed
        members = [Member(*_model_and_objective(case, data), data_seed=0) for _ in range(stack)]
        train_stacked(members, data, cfg)
    else:
        model, objective = _model_and_objective(case, data)
        train(model, data, objective, cfg, data_seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--stack", type=int, default=1)
    p.add_argument("--gpu-scale", action="store_true")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # as the executors run each run
    case = {c.name: c for c in cases(args.gpu_scale)}[args.model]
    data = synthetic(case, case.batch * 80, args.device)  # 80 steps an epoch, as the default
    cfg = TrainConfig(batch_size=case.batch, max_steps=3, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile)  # fmt: skip
    run(case, data, cfg, args.stack)  # warm-up: allocations, kernel selection
    print(f"load average {os.getloadavg()[0]:.2f}; {args.model}, batch {case.batch}, "
          f"stack {args.stack}, {args.device}")  # fmt: skip
    print(arithmetic(case, data, replace(cfg, max_steps=args.steps), args))
    activities = [ProfilerActivity.CPU]
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run(case, data, replace(cfg, max_steps=args.steps), args.stack)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(phases(prof))


def arithmetic(case, data, cfg: TrainConfig, args) -> str:
    """Time per step without the profiler, and how much of the machine it uses."""
    seconds = float("inf")
    for _ in range(3):
        _sync(args.device)
        start = time.perf_counter()
        run(case, data, cfg, args.stack)
        _sync(args.device)
        seconds = min(seconds, time.perf_counter() - start)
    per_step = seconds / cfg.max_steps
    model, _ = _model_and_objective(case, data)
    flops = training_flops(model, data.train_x[: case.batch]) * args.stack
    peak = matmul_peak(args.device, threads=1)
    rate = flops / per_step
    return (
        f"step {per_step * 1e3:.3f} ms; {flops / 1e6:.1f} MFLOP a step counted from the "
        f"model: {rate / 1e9:.1f} GFLOP/s, {rate / peak:.0%} of the matmul peak measured "
        f"now ({peak / 1e9:.1f} GFLOP/s{', one thread' if args.device == 'cpu' else ''})"
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phases(prof) -> str:
    """Shares of the profiled CPU time: the autograd engine's backward functions, the
    optimizer's step and zero_grad, and the rest (forward, loss, batches)."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    scope = lambda *prefixes: sum(  # noqa: E731
        e.cpu_time_total for e in events if e.key.startswith(prefixes)
    )
    backward = scope("autograd::engine::evaluate_function")
    optimizer = scope("Optimizer.step#", "Optimizer.zero_grad#", "aten::_fused_adam",
                      "aten::_foreach_add_")  # fmt: skip
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                              "aten::mkldnn_convolution", "aten::convolution_backward"))  # fmt: skip
    rest = total - backward - optimizer
    return (f"CPU time: matrix multiplies and convolutions (self) {matmul / total:.0%}; "
            f"backward {backward / total:.0%}, optimizer {optimizer / total:.0%}, "
            f"forward, loss and batches {rest / total:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
