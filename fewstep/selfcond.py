"""Self-conditioning (Analog Bits; Chen, Zhang, Hinton, ICLR 2023; distribution.md §6), once for every
method and teacher.

A self-conditioned backbone (``Backbone.enable_self_conditioning``) reads, next to x, an estimate x~0
of its own output as extra input channels (zeros: "no estimate"). Three ways to call it:

- training (§6.1, :func:`training_estimate`): for a random half of the batch the estimate is a first,
  no-grad pass with zeros (x-clipped for pixel data); the other half gets zeros; the loss applies to the
  second pass only;
- as a deterministic function (§6.4, :func:`two_pass`): a first pass with zeros, then the pass with its
  (stop-gradient) estimate: 2 evaluations. This is how a frozen self-conditioned *teacher* is queried;
- sampling (§6.2, :class:`RunningEstimate`): each call is fed the previous call's output, starting from
  zeros (momentum 0, the official default): 1 evaluation per step.

Estimates are x0 predictions in the sigma-space convention of ``fewstep.diffusion`` (the same scale
as the data), fed to the network as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewstep.types import Cond

__all__ = ["RunningEstimate", "denoise", "enabled", "mask", "training_estimate", "two_pass"]

#: The share of a batch trained with an estimate (pix2seq's ``self_cond_rate``; distribution.md §6.1).
SELF_COND_RATE = 0.5


def enabled(net: Any) -> bool:
    """Whether ``net`` (possibly wrapped for multi-process training, or any student module) is a
    self-conditioned Backbone."""
    from fewstep.nn import unwrap

    return bool(getattr(unwrap(net), "self_conditioning", False))


def denoise(process: Any, net: Any, x: Tensor, sigma: Tensor | float, cond: Cond | None = None, *,
            estimate: Tensor | None = None, **scalars: Tensor) -> Tensor:
    """D(x, sigma | x~0) of a self-conditioned network; ``estimate=None`` means zeros."""
    return process.denoise(net, x, sigma, cond, extra_input=estimate, **scalars)


@torch.no_grad()
def two_pass(process: Any, net: Any, x: Tensor, sigma: Tensor | float, cond: Cond | None = None, *,
             clip: bool = False, **scalars: Tensor) -> Tensor:
    """The deterministic self-conditioned prediction D(x | sg D(x | 0)) (distribution.md §6.4)."""
    first = denoise(process, net, x, sigma, cond, **scalars)
    return denoise(process, net, x, sigma, cond, estimate=first.clamp(-1, 1) if clip else first, **scalars)


@torch.no_grad()
def training_estimate(process: Any, net: Any, x: Tensor, sigma: Tensor, cond: Cond | None, use: Tensor, *,
                      clip: bool = False, **scalars: Tensor) -> Tensor:
    """The estimate slot of a training batch (distribution.md §6.1): sg D(x | 0) for samples where ``use``
    (B,) is True, zeros elsewhere. The first pass runs only on the used samples."""
    estimate = torch.zeros_like(x)
    idx = use.nonzero().flatten()
    if idx.numel():
        sub = {k: v[idx] if isinstance(v, Tensor) and v.ndim and v.shape[0] == x.shape[0] else v
               for k, v in scalars.items()}
        sigma = torch.as_tensor(sigma, device=x.device)
        first = denoise(process, net, x[idx], sigma[idx] if sigma.ndim else sigma,
                        cond.index(idx) if cond is not None else None, **sub)
        estimate[idx] = (first.clamp(-1, 1) if clip else first).to(estimate.dtype)
    return estimate


class RunningEstimate:
    """A sampler's denoiser that feeds each call the previous call's output (distribution.md §6.2).

    ``fn(x, sigma, estimate)`` -> x0; the wrapper is called as ``(x, sigma)`` like any sigma-space
    denoiser, so every fewstep sampler (ODE solvers, consistency sampling) runs self-conditioned.
    """

    def __init__(self, fn: Any, clip: bool = False) -> None:
        self.fn, self.clip, self.previous = fn, clip, None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.fn(x, sigma, self.previous)
        self.previous = (out.clamp(-1, 1) if self.clip else out).detach()
        return out


def mask(step: Any, rate: float = SELF_COND_RATE) -> Tensor:
    """(B,) True for the samples trained with an estimate, drawn with the step's generator."""
    return step.rand() < rate

