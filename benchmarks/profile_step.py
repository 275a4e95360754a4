"""Where a training step's time goes: torch.profiler over the engine's training loop.

    python benchmarks/profile_step.py [--model mlp|cnn|resnet18|audio_cnn|nanogpt]
        [--device cpu|cuda] [--steps N] [--stack K] [--gpu-scale] [--rows N]
        [--precision bf16] [--channels-last] [--compile]

Trains the model of benchmarks/throughput.py (synthetic data of its modality's shape, KD
from cached teacher logits) for a few warm-up steps, then profiles `--steps` steps and
prints the operators that took the most self time (CPU, and CUDA where present), grouped
into forward, backward, optimizer and the rest by the share of the total they took.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    p.add_argument("--steps", type=int, default=20)
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
    data = synthetic(case, case.batch * 4, args.device)
    cfg = TrainConfig(batch_size=case.batch, max_steps=3, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile)  # fmt: skip
    run(case, data, cfg, args.stack)  # warm-up: allocations, kernel selection
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


def phases(prof) -> str:
    """Shares of the profiled CPU time: the autograd engine's backward functions, the
    optimizer's step and zero_grad, and the rest (forward, loss, batches)."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    scope = lambda *prefixes: sum(  # noqa: E731
        e.cpu_time_total for e in events if e.key.startswith(prefixes)
    )
    backward = scope("autograd::engine::evaluate_function")
    optimizer = scope("Optimizer.step#", "Optimizer.zero_grad#")
    rest = total - backward - optimizer
    return (f"CPU time: backward {backward / total:.0%}, optimizer {optimizer / total:.0%}, "
            f"forward, loss and batches {rest / total:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
