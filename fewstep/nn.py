"""Small network utilities shared by the core and plugins: EMA updates, unwrapping, shared dropout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel / compiled wrapper (attribute access, saving)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameters and floating buffers alike."""
    src = unwrap(source)
    t_params = list(target.parameters())
    s_params = [p.detach() for p in src.parameters()]
    if decay == 0.0:
        torch._foreach_copy_(t_params, s_params)
    else:
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    buffers = dict(target.named_buffers())
    for name, sb in src.named_buffers():  # by name: the target may carry buffers of its own (flags)
        buffers[name].copy_(sb)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off, e.g. a target network or an evaluation EMA."""
    import copy

    clone = copy.deepcopy(unwrap(module))
    clone.requires_grad_(False)
    return clone


@contextlib.contextmanager
def same_dropout() -> Iterator[None]:
    """Run the body with the RNG state it started with restored afterwards.

    Use it around the online pass, then run the target pass: both draw the same dropout masks, as all
    official CM / ECT / CTM code does (consistency.md §1, "Shared dropout mask")."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def requires_grad(modules: list[nn.Module], flag: bool) -> Iterator[None]:
    """Temporarily set ``requires_grad`` on every parameter of ``modules``."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, was in saved:
            p.requires_grad_(was)
