"""Device speed-ups of the training step: bf16 autocast, channels_last, torch.compile.

Each is a TrainConfig switch (off by default) that applies on CUDA only; on the CPU the
step runs exactly as without it, and the run's record says what was applied. Metrics never
see bf16: the loss is computed on fp32 logits, and evaluation runs without autocast.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, vmap

Forward = Callable[[torch.Tensor], torch.Tensor]  # inputs (B, ...) -> logits


@dataclass(frozen=True)
class Accel:
    """The speed-ups that apply to one run on its device."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    def describe(self) -> dict:
        return {
            "precision": "bf16" if self.bf16 else "fp32",
            "channels_last": self.channels_last,
            "compiled": self.compile,
        }

    def autocast(self):
        """bf16 autocast for the forward pass (CUDA), else nothing."""
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC in memory
        return x


def accel_for(model: nn.Module, cfg, device: torch.device) -> Accel:
    """What of cfg.precision / channels_last / compile applies to `model` on `device`."""
    cuda = torch.device(device).type == "cuda"
    return Accel(
        bf16=cuda and cfg.precision == "bf16",
        channels_last=cuda and cfg.channels_last and _has_conv2d(model),
        compile=cuda and cfg.compile,
    )


def prepare(model: nn.Module, accel: Accel) -> Forward:
    """Put `model` in the layout `accel` asks for; return its training forward."""
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    if not accel.compile:
        return model
    fn = compiled(model)
    # every name of a tied weight: the meta skeleton's copies are no longer tied
    params = lambda: dict(model.named_parameters(remove_duplicate=False))  # noqa: E731
    return lambda x: fn(params(), dict(model.named_buffers()), x)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# One compiled function per architecture (and backend) per process. Parameters and buffers
# are its inputs, not constants: every run of the architecture reuses the compiled code.
_COMPILED: dict[tuple[str, str, bool], Callable] = {}


def compiled(model: nn.Module, backend: str = "inductor", stacked: bool = False) -> Callable:
    """torch.compile of the training forward `functional_call(architecture, (params,
    buffers), x)` (training mode: batch norm uses batch statistics, dropout is on); stacked:
    vmapped over a leading model dimension of all three, random draws made once for the
    stack (kdaudit.engine.stacking)."""
    key = (architecture_key(model), backend, stacked)
    if key not in _COMPILED:
        # structure only (its tensors are replaced), in training mode whatever model's mode
        skeleton = copy.deepcopy(model).to("meta").train()
        fn = partial(_call, skeleton)
        fn = vmap(fn, randomness="same") if stacked else fn
        _COMPILED[key] = torch.compile(fn, backend=backend)
    return _COMPILED[key]


def architecture_key(model: nn.Module) -> str:
    # repr lists every submodule with its type and shapes, e.g. Linear(in_features=40, ...)
    return f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}"


def _call(skeleton: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(skeleton, (params, buffers), (x,))
