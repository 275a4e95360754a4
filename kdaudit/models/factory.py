"""Models from user code: `model: {factory: "package.module:function", kwargs: {...}}` in a
config, or a factory passed to `kdaudit.audit()` (entry `in_memory`).

A factory is called as fn(seed, **kwargs) and returns an nn.Module mapping inputs (B, ...) to
logits (B, K). `build_model` seeds torch's global RNG with the same seed just before, so a
factory that only draws from torch's RNG (every torchvision model does) is a pure function
of the seed, as the protocol's shared initialisations need.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from kdaudit.models.configs import FactoryModelConfig, InMemoryModelConfig
from kdaudit.user_code import (
    UserCodeError,
    import_callable,
    recall,
    reference_of,
    remember,
)


def build_factory_model(cfg: FactoryModelConfig, input_shape, num_classes: int) -> nn.Module:
    fn = import_callable(cfg.factory, "model.factory")
    return checked_build(fn, cfg.kwargs, input_shape, num_classes, f"model factory {cfg.factory}")


def build_in_memory_model(cfg: InMemoryModelConfig, input_shape, num_classes: int) -> nn.Module:
    fn = recall("model", cfg.fingerprint)
    return checked_build(fn, {}, input_shape, num_classes, f"model {cfg.factory}")


def checked_build(
    fn: Callable, kwargs: dict, input_shape: tuple[int, ...], num_classes: int, what: str
) -> nn.Module:
    seed = torch.initial_seed()  # build_model has just seeded torch with the run's init seed
    model = fn(seed, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module; "
                            "it must build and return the model")  # fmt: skip
    _check_classes(model, input_shape, num_classes, what)
    return model


def output_size(model: nn.Module, input_shape: tuple[int, ...], what: str) -> int:
    """Logits per example (the last dimension) for one all-zero input, in eval mode."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()  # batch norm in train mode refuses a batch of one
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape, device=device))
    except Exception as err:
        raise UserCodeError(f"{what} fails on one input of the dataset's shape "
                            f"(1, {', '.join(map(str, input_shape))}): {err}") from None  # fmt: skip
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserCodeError(f"{what} returns a {type(out).__name__}; it must return the logits "
                            "tensor (B, K)")  # fmt: skip
    return out.shape[-1]


def in_memory_model(
    fn: Callable[[int], nn.Module],
    name: str | None = None,
    *,
    role: str = "model",
    expect: tuple[tuple[int, ...], int] | None = None,  # (input shape, classes) to check
) -> dict:
    """The config section of a model factory passed in memory, registered in this process.
    Its fingerprint covers the factory's name, the architecture it builds (the module tree
    and every tensor's name and shape) and the sha256 of the weights it builds for seed 0,
    so two factories sharing a name (closures) differ when their models do, and so does a
    factory whose initialisation changed; a change to forward() code alone is not seen."""
    ref = name or reference_of(fn)
    first, second = _seeded(fn, 0), _seeded(fn, 0)
    if not _same_weights(first, second):
        raise UserCodeError(f"{role} factory {ref} gives different weights for the same seed; "
                            "draw its initial weights from torch's RNG (kdaudit seeds it) or "
                            "from the seed argument")  # fmt: skip
    if expect is not None:
        _check_classes(first, *expect, f"{role} factory {ref}")
    fingerprint = _digest(ref, first)
    remember("model", fingerprint, fn)
    return {"name": "in_memory", "factory": ref, "fingerprint": fingerprint}


def _seeded(fn: Callable, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fn(seed)
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"model factory {reference_of(fn)} returned a "
                            f"{type(model).__name__}, not a torch.nn.Module")  # fmt: skip
    return model


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _check_classes(model: nn.Module, input_shape: tuple[int, ...], k: int, what: str) -> None:
    out = output_size(model, input_shape, what)
    if out != k:
        raise UserCodeError(f"{what} outputs {out} logits per example but the dataset has {k} "
                            f"classes; make its last layer output {k}")  # fmt: skip


def _digest(ref: str, model: nn.Module) -> str:
    """sha256 of the factory's name, its architecture and its seed-0 weights (bytes)."""
    state = model.state_dict()
    shapes = [(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()]
    h = hashlib.sha256(repr((ref, repr(model), shapes)).encode())
    for v in state.values():
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
