"""Training throughput per modality's model: kdaudit's engine against a plain PyTorch loop.

    python benchmarks/throughput.py [--models mlp,cnn,resnet18,audio_cnn,nanogpt]
        [--device cpu|cuda] [--steps N] [--stack K] [--gpu-scale]
        [--precision bf16] [--channels-last] [--compile] [--peak-tflops X]

Each model trains on synthetic data of its modality's shape for a few warm-up steps, then
`--steps` timed steps, on each side in the same process: the engine (`kdaudit.engine.loop.train`
with KD from cached teacher logits; `--stack K`: K models at once with kdaudit.engine.stacking,
where the model allows) and the plain loop of benchmarks/plain_loop.py (DataLoader,
loss.item() per step, default Adam, a teacher forward per batch). Language models train
on plain next-token cross-entropy on both sides. Reported: examples (tokens, for nanogpt)
per second, and the engine's model FLOP utilisation: FLOPs per step counted once with
torch's FlopCounterMode, over the peak of a large matmul measured in this run, in the run's
precision (CPU: one thread, as the executors give each run). The ratios engine / plain
come last.
The default sizes take seconds per model on a CPU; --gpu-scale uses the paper's sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peak import machine_peak, matmul_peak  # noqa: E402
from benchmarks.plain_loop import plain_loss  # noqa: E402
from kdaudit.conditions.objectives import build_objective  # noqa: E402
from kdaudit.config import TrainConfig  # noqa: E402
from kdaudit.data import TensorData  # noqa: E402
from kdaudit.engine.loop import train  # noqa: E402
from kdaudit.engine.stacking import Member, train_stacked  # noqa: E402
from kdaudit.engine.teachers import cached_targets  # noqa: E402
from kdaudit.models import build_model  # noqa: E402
from kdaudit.models.audio import AudioCNNConfig  # noqa: E402
from kdaudit.models.gpt import GPTConfig  # noqa: E402
from kdaudit.models.mlp import MLPConfig  # noqa: E402
from kdaudit.models.vision import CNNConfig, ResNetConfig  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    model: object  # a registered model config
    input_shape: tuple[int, ...]
    classes: int
    batch: int
    tokens: bool = False  # inputs are token ids (B, T); throughput counts tokens


def cases(gpu_scale: bool) -> list[Case]:
    big = gpu_scale
    gpt = GPTConfig(dropout=0.2) if big else GPTConfig(n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    return [
        Case("mlp", MLPConfig(width=256, depth=2), (40,), 10, 128),
        Case("cnn", CNNConfig(), (3, 32, 32), 10, 512 if big else 64),
        Case("resnet18", ResNetConfig(), (3, 32, 32), 10, 512 if big else 8),
        Case("audio_cnn", AudioCNNConfig(), (1, 32, 101), 35, 256 if big else 32),
        Case("nanogpt", gpt, (256 if big else 64,), 65, 64 if big else 8, tokens=True),
    ]


def synthetic(case: Case, n: int, device: str) -> TensorData:
    g = torch.Generator().manual_seed(0)
    if case.tokens:
        x = torch.randint(0, case.classes, (n, *case.input_shape), generator=g)
        y = torch.roll(x, -1, dims=1)  # (N, T) next tokens
    else:
        x = torch.randn(n, *case.input_shape, generator=g)
        y = torch.randint(0, case.classes, (n,), generator=g)
    return TensorData(x, y, x[:8], y[:8], case.classes).to(device)


def engine_rate(case: Case, data, steps: int, warm: int, args) -> float:
    """Examples (or tokens) per second of kdaudit's training loop."""
    cfg = TrainConfig(batch_size=case.batch, max_steps=warm, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile)  # fmt: skip
    run = lambda c: _engine(case, data, c)  # noqa: E731
    run(cfg)  # warm-up (and compilation)
    return _rate(lambda: run(_steps(cfg, steps)), case, steps)


def _engine(case: Case, data, cfg: TrainConfig) -> None:
    model, objective = _model_and_objective(case, data)
    train(model, data, objective, cfg, data_seed=1)


def _model_and_objective(case: Case, data):
    model = build_model(case.model, case.input_shape, case.classes, 0).to(data.device)
    if case.tokens:
        return model, build_objective("siddo", None, None, case.classes)
    teacher = torch.randn(data.n_train, case.classes, device=data.device)  # (N, K) cached
    return model, build_objective("kd", 0.5, 1.0, case.classes, cached_targets(teacher))


def stacked_rate(case: Case, data, steps: int, warm: int, k: int) -> float:
    """Examples per second summed over K stacked models: the paired runs of one data seed
    (same batches and dropout masks), as an audit's stacks are formed."""
    cfg = TrainConfig(batch_size=case.batch, max_steps=warm)

    def run(c):
        members = [Member(*_model_and_objective(case, data), data_seed=0) for _ in range(k)]
        train_stacked(members, data, c)

    run(cfg)
    return k * _rate(lambda: run(_steps(cfg, steps)), case, steps)


def plain_rate(case: Case, data, steps: int, warm: int) -> float:
    """Examples per second of the hand-written loop (benchmarks/plain_loop.py)."""
    model = build_model(case.model, case.input_shape, case.classes, 0).to(data.device)
    teacher = None if case.tokens else build_model(case.model, case.input_shape, case.classes, 1)
    teacher = teacher.to(data.device).eval() if teacher is not None else None
    spec = SimpleNamespace(condition="siddo" if case.tokens else "kd", alpha=0.5, temperature=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), case.batch, shuffle=True)

    def run(n: int) -> None:
        done = 0
        while done < n:
            for x, y in loader:
                logits = model(x).flatten(0, -2)  # (B, K) or (B * T, V)
                loss = plain_loss(spec, logits, y.reshape(-1), x, _flat(teacher))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()  # the per-step log line
                done += 1
                if done == n:
                    return

    model.train()
    run(warm)
    return _rate(lambda: run(steps), case, steps)


def _flat(teacher):
    return None if teacher is None else (lambda x: teacher(x).flatten(0, -2))


def _steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    return replace(cfg, max_steps=steps)


def _rate(fn, case: Case, steps: int) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    per_step = case.batch * (case.input_shape[0] if case.tokens else 1)
    return steps * per_step / (time.perf_counter() - start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops_per_example(case: Case, data) -> float:
    """Training FLOPs (forward and backward) per example (per token for language models)."""
    model = build_model(case.model, case.input_shape, case.classes, 0).to(data.device)
    x = data.train_x[: case.batch]
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    per = case.batch * (case.input_shape[0] if case.tokens else 1)
    return counter.get_total_flops() / per


def peak_flops(device: str, precision: str, override: float | None) -> float:
    """The peak MFU is measured against: a large matmul now, one thread on the CPU."""
    if override:
        return override * 1e12
    if device == "cpu":
        return matmul_peak("cpu", threads=1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return machine_peak(device, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mlp,cnn,resnet18,audio_cnn,nanogpt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--stack", type=int, default=8, help="models per stack (0: skip)")
    p.add_argument("--gpu-scale", action="store_true", help="the paper's batch and model sizes")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: measured now)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # as the executors run each run
    wanted = args.models.split(",")
    peak = peak_flops(args.device, args.precision, args.peak_tflops)
    load = os.getloadavg()[0]
    print(f"device {args.device}; load average {load:.2f}; {args.steps} timed steps per side; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(f"{'model':10s} {'unit':7s} {'plain/s':>10s} {'engine/s':>10s} {'stacked/s':>10s} MFU")
    ratios = []
    for case in (c for c in cases(args.gpu_scale) if c.name in wanted):
        data = synthetic(case, case.batch * 4, args.device)
        plain = plain_rate(case, data, args.steps, args.warm)
        engine = engine_rate(case, data, args.steps, args.warm, args)
        stacked = (
            stacked_rate(case, data, args.steps, args.warm, args.stack) if args.stack else None
        )
        mfu = f"{engine * flops_per_example(case, data) / peak:.1%}"
        unit = "tokens" if case.tokens else "examples"
        st = f"{stacked:10.0f}" if stacked else f"{'-':>10s}"
        print(f"{case.name:10s} {unit:7s} {plain:10.0f} {engine:10.0f} {st} {mfu}")
        ratios.append((case.name, engine / plain, stacked / plain if stacked else None, mfu))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    for name, engine, stacked, mfu in ratios:
        extra = f", stacked x{args.stack} / plain {stacked:.2f}x" if stacked else ""
        print(f"ratio {name}: engine / plain {engine:.2f}x{extra}; engine {mfu} of peak")


if __name__ == "__main__":
    main()
