"""What torch.compile would give a stack of the default audit's MLPs on the CPU.

    python benchmarks/compile_stack.py [--stack 7] [--steps 800] [--mode max-autotune] [--cold]

One training of K MLPs 40-256-256-10 (batch 128, one torch thread, as a worker trains a
student seed's stack), each with its own distillation loss (1 - alpha) CE + alpha KL toward
fixed teacher probabilities, and one fused Adam over the stack. Every 20 steps the step's
forward, loss and backward switch between eager and `torch.compile` (Adam stays eager in
both), so both are timed on the same weights at the same moment of the machine, whose
speed drifts by 20 to 30% within minutes. Prints the compile time (`--cold`: with an empty
inductor cache, as a first `make run` would get), each side's time per model and step, their
ratio, and the share of the one-thread matmul peak measured in the same run.

The step is written here as a plain batched MLP, the engine's stacked step without its
bitwise machinery, so that both sides run the same Python; it measures what compiling
could win, not the engine itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peak import matmul_peak, training_flops  # noqa: E402
from kdaudit.models import build_model  # noqa: E402
from kdaudit.models.mlp import MLPConfig  # noqa: E402

DIMS = (40, 256, 256, 10)
BATCH = 128
N = 10_000


class Stack:
    def __init__(self, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.params = []
        for d_in, d_out in pairwise(DIMS):
            w = torch.randn(k, d_in, d_out, generator=g) / d_in**0.5
            self.params += [w.requires_grad_(), torch.zeros(k, 1, d_out, requires_grad=True)]
        self.alpha = torch.linspace(0.0, 0.9, k)
        self.x = torch.randn(N, DIMS[0], generator=g)
        self.y = torch.randint(0, DIMS[-1], (N,), generator=g)
        self.p = torch.softmax(torch.randn(N, DIMS[-1], generator=g), -1)
        self.k = k
        self.optimizer = torch.optim.Adam(self.params, 1e-3, fused=True)

    def loss(self, params, x, y, p):
        h = x.expand(self.k, *x.shape)  # one data seed: every run sees the same batch
        for i in range(0, len(params), 2):
            h = torch.baddbmm(params[i + 1], h, params[i])
            if i + 2 < len(params):
                h = torch.relu(h)
        logp = torch.log_softmax(h, -1)
        ce = -logp.gather(-1, y.expand(self.k, -1).unsqueeze(-1)).squeeze(-1).mean(-1)
        kl = (p * (torch.log(p) - logp)).sum(-1).mean(-1)
        return ((1 - self.alpha) * ce + self.alpha * kl).sum()

    def step(self, loss, j: int) -> None:
        start = j * BATCH % (N - BATCH)
        idx = torch.arange(start, start + BATCH)
        loss(self.params, self.x[idx], self.y[idx], self.p[idx]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stack", type=int, default=7)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--mode", default=None, help="torch.compile's mode (default: its default)")
    p.add_argument("--cold", action="store_true", help="compile with an empty inductor cache")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        if args.cold:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        measure(args)


def measure(args) -> None:
    stack = Stack(args.stack)
    compiled = torch.compile(stack.loss, mode=args.mode)
    stack.step(stack.loss, 0)
    start = time.perf_counter()
    stack.step(compiled, 0)
    stack.step(compiled, 1)  # a second call: anything recompiled on it is counted too
    compiling = time.perf_counter() - start
    seconds = {"eager": 0.0, "compiled": 0.0}
    rounds = max(1, args.steps // 40)
    for r in range(rounds):
        for name, loss in (("eager", stack.loss), ("compiled", compiled)):
            start = time.perf_counter()
            for j in range(20):
                stack.step(loss, 40 * r + j)
            seconds[name] += time.perf_counter() - start
    per = {name: s / (rounds * 20 * args.stack) for name, s in seconds.items()}
    flops = training_flops(_one_mlp(), torch.randn(BATCH, DIMS[0]))
    peak = matmul_peak(threads=1)
    print(f"load average {os.getloadavg()[0]:.2f}; stack of {args.stack}, mode "
          f"{args.mode or 'default'}, {'cold' if args.cold else 'warm'} inductor cache")  # fmt: skip
    print(f"compiling: {compiling:.1f} s")
    for name, s in per.items():
        print(f"{name}: {s * 1e3:.3f} ms a model and step, {flops / s / peak:.0%} of the "
              f"one-thread matmul peak ({peak / 1e9:.0f} GFLOP/s)")  # fmt: skip
    print(f"compiled / eager: {per['compiled'] / per['eager']:.2f}")


def _one_mlp() -> torch.nn.Module:
    """kdaudit's MLP of the default audit, whose FLOPs the step counts once per model."""
    return build_model(MLPConfig(width=DIMS[1], depth=len(DIMS) - 2), DIMS[:1], DIMS[-1], 0)


if __name__ == "__main__":
    main()
