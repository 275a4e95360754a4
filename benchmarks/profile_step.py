"""Where a training step's time goes: the engine's step against the arithmetic in it.

    python benchmarks/profile_step.py [--model mlp|cnn|resnet18|audio_cnn|nanogpt]
        [--device cpu|cuda] [--steps N] [--stack K] [--gpu-scale] [--rows N]
        [--precision bf16] [--channels-last] [--compile]

Trains the model of benchmarks/throughput.py (synthetic data of its modality's shape, KD
from cached teacher logits; the default, mlp, is the default audit's MLP 40-256-256-10 at
batch 128) as an executor runs it (CPU: one torch thread). First, without the profiler: the
time per step (fastest of three), the step's FLOPs counted from the model, the rate this
achieves and its fraction of the peak of a large matmul measured now (one thread on the
CPU, as one run gets; the device on a GPU). On the CPU (one model at a time) two floors
beside it, measured now: the step's matrix multiplies alone (each shape it multiplies,
replayed on its own) and, for the MLP, the same step with 8-wide hidden layers (what its
operators, autograd and optimizer cost with almost no arithmetic). Then torch.profiler over
`--steps` steps: the operators that took the most self time, and the shares of matrix
multiplies (the arithmetic), backward, optimizer, and forward, loss and batches.
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
    line, per_step = arithmetic(case, data, replace(cfg, max_steps=args.steps), args)
    print(line)
    if args.device == "cpu" and args.stack == 1:
        print(floors(case, data, replace(cfg, max_steps=args.steps), per_step))
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


def arithmetic(case, data, cfg: TrainConfig, args) -> tuple[str, float]:
    """Time per step without the profiler, and how much of the machine it uses."""
    per_step = step_time(case, data, cfg, args.stack, args.device)
    model, _ = _model_and_objective(case, data)
    flops = training_flops(model, data.train_x[: case.batch]) * args.stack
    peak = matmul_peak(args.device, threads=1)
    rate = flops / per_step
    return (
        f"step {per_step * 1e3:.3f} ms; {flops / 1e6:.1f} MFLOP a step counted from the "
        f"model: {rate / 1e9:.1f} GFLOP/s, {rate / peak:.0%} of the matmul peak measured "
        f"now ({peak / 1e9:.1f} GFLOP/s{', one thread' if args.device == 'cpu' else ''})"
    ), per_step


def step_time(case, data, cfg: TrainConfig, stack: int, device: str) -> float:
    """Seconds per step of a whole training run of cfg.max_steps steps, fastest of three."""
    seconds = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        run(case, data, cfg, stack)
        _sync(device)
        seconds = min(seconds, time.perf_counter() - start)
    return seconds / cfg.max_steps


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def floors(case, data, cfg: TrainConfig, per_step: float) -> str:
    """What the CPU step is made of, measured now: its matrix multiplies alone (every shape
    the step multiplies, replayed on its own with contiguous operands already in cache) and,
    for the MLP, the same step with 8-wide hidden layers (the cost of its operators, autograd
    and optimizer with almost no arithmetic). The step cannot be faster than the first
    without multiplying faster, nor shed the second without fewer operators."""
    steps = 20
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(case, data, replace(cfg, max_steps=steps), 1)
    seconds, count = 0.0, 0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in MATMULS:
            seconds += event.count / steps * _matmul_alone(event.key, event.input_shapes)
            count += event.count
    line = (f"its {count / steps:.0f} matrix multiplies alone (each shape replayed, operands in "
            f"cache): {seconds * 1e3:.3f} ms, {seconds / per_step:.0%} of the step")  # fmt: skip
    if case.name == "mlp":
        narrow = replace(case, model=replace(case.model, width=8))
        small = synthetic(narrow, len(data.train_x), "cpu")
        run(narrow, small, replace(cfg, max_steps=3), 1)  # warm-up
        floor = step_time(narrow, small, cfg, 1, "cpu")
        line += (f"; the same step with 8-wide hidden layers: {floor * 1e3:.3f} ms, "
                 f"{floor / per_step:.0%} of the step")  # fmt: skip
    return line


def _matmul_alone(key: str, shapes: list) -> float:
    """Seconds of one multiply of these operand shapes (the profiler's), fastest of five
    timings of 50 (addmm and baddbmm: bias, then the two matrices)."""
    a, b = (shapes[1], shapes[2]) if key in ("aten::addmm", "aten::baddbmm") else shapes[:2]
    x, y = torch.randn(a), torch.randn(b)
    op = torch.bmm if len(a) == 3 else torch.mm
    op(x, y)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            op(x, y)
        best = min(best, (time.perf_counter() - start) / 50)
    return best


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
