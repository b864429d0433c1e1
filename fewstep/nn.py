"""Small network utilities shared by the core and plugins: EMA updates, unwrapping, shared dropout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from weakref import WeakKeyDictionary

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel / compiled wrapper (attribute access, saving)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


# target -> (source, target parameters, source parameters, target buffers, source buffers): the tensor lists of
# ema_update, built once per (target, source) pair instead of on every call (1.2 ms a step on the digits UNet,
# issue 15). Updates are in place, so the same tensors stay valid while the modules keep their parameters.
_EMA_LISTS: WeakKeyDictionary[nn.Module, tuple] = WeakKeyDictionary()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameters and floating buffers alike."""
    src = unwrap(source)
    lists = _EMA_LISTS.get(target)
    if lists is None or lists[0] is not src:
        buffers = dict(target.named_buffers())
        named = [(buffers[n], b) for n, b in src.named_buffers()]  # by name: the target may carry its own (flags)
        lists = _EMA_LISTS[target] = (src, list(target.parameters()), list(src.parameters()),
                                      [t for t, _ in named], [b for _, b in named])
    _, t_params, s_params, t_buffers, s_buffers = lists
    if decay == 0.0:
        torch._foreach_copy_(t_params, s_params)
    else:
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for t, b in zip(t_buffers, s_buffers):
        t.copy_(b)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off, e.g. a target network or an evaluation EMA."""
    import copy

    clone = copy.deepcopy(unwrap(module))
    clone.requires_grad_(False)
    return clone


@contextlib.contextmanager
def same_dropout() -> Iterator[None]:
    """Run the body with the RNG state it started with restored afterwards.

    Use it around the first of two passes (the online or the target pass), then run the other: both draw the
    same dropout masks, as all official CM / ECT / CTM code does (consistency.md §1, "Shared dropout mask")."""
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
