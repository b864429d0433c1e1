"""Few-step samplers shared by method plugins, and the validation driver.

All samplers work in sigma space (``fewstep.diffusion``): x = x0 + sigma * eps, started from
``noise * sigma_max``; they return model-space samples (latents for a latent teacher).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion import karras_sigmas
from fewstep.types import Cond, Nets, RunContext

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,H,W), sigma (B,)) -> (B,C,H,W)


def sampling_net(nets: Nets) -> nn.Module:
    """The network to sample from: the evaluation EMA when there is one, else the student."""
    return nets.ema if nets.ema is not None else nets.student


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Switch modules to eval mode (no dropout) for the body, then restore their flags."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def consistency_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Noise levels tau_1 > ... > tau_N of an N-step sampler with no training grid to pick from: the first N points
    of an (N+1)-point Karras grid from sigma_max to sigma_min (for N = 1 just sigma_max)."""
    return karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho)[:-1].tolist()


def grid_levels(grid: Tensor | Sequence[float], num_steps: int) -> list[float]:
    """The N levels of a multistep sampler taken from a method's descending training grid g_0 > ... > g_{M-1}:
    g_{i * (M // N)} for i = 0..N-1, so the sampler only queries levels the student was trained on.

    CM picks its levels from the training grid by an FID search (consistency.md §2.7: ImageNet-64 CD, 2 steps:
    index 22 of 40); this is the rule of diffusers' ``CMStochasticIterativeScheduler.set_timesteps(N)`` on M
    training timesteps (N = 2 on 40 points: index 20), so a stock export whose scheduler holds the same grid
    reproduces it with ``num_inference_steps=N``. Raises when the grid has fewer than N levels."""
    levels = [float(v) for v in (grid.tolist() if isinstance(grid, Tensor) else grid)]
    if len(levels) < num_steps:
        raise ValueError(f"a {num_steps}-step sampler needs {num_steps} trained levels, but the training grid has "
                         f"only {len(levels)}; sample with fewer steps, train on a finer grid (method.num_scales), "
                         f"or give the levels as method.sample_sigmas[{num_steps}]")
    stride = len(levels) // num_steps
    return [levels[i * stride] for i in range(num_steps)]


def sampler_sigmas(overrides: dict[int, list[float]], num_steps: int, grid: Tensor | Sequence[float]) -> list[float]:
    """The N levels of a multistep sampler: a recipe's ``method.sample_sigmas[N]`` when given (checked to hold N
    levels), else :func:`grid_levels` of the method's training grid (descending)."""
    sigmas = overrides.get(num_steps) or grid_levels(grid, num_steps)
    if len(sigmas) != num_steps:
        raise ValueError(f"method.sample_sigmas[{num_steps}] has {len(sigmas)} levels; expected {num_steps}")
    return sigmas


def consistency_sample(f: Denoiser, noise: Tensor, sigmas: list[float], sigma_min: float,
                       generator: torch.Generator | None = None, clamp: bool = False) -> Tensor:
    """Multistep consistency sampling (CM Algorithm 1).

    x <- f(sigma_1 * z, sigma_1); then for each later tau: re-noise x + sqrt(tau^2 - sigma_min^2) * z_n
    with fresh noise and map back with f. ``clamp`` bounds pixel outputs to [-1, 1] after every
    evaluation, as the official sampler does. noise: (B, C, H, W) standard normal.
    """
    def call(x: Tensor, sigma: float) -> Tensor:
        out = f(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype))
        return out.clamp(-1.0, 1.0) if clamp else out

    x = call(noise * sigmas[0], sigmas[0])
    for tau in sigmas[1:]:
        z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
        x = call(x + (tau**2 - sigma_min**2) ** 0.5 * z, tau)
    return x


@torch.no_grad()
def generate(hook: Any, ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
             seed: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Student samples in data space (decoded for latent teachers) through ``fewstep_sample``.
    Noise the sampler injects comes from ``generator``, or from a fresh one seeded with ``seed``."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    with eval_mode(*[nets.get(n) for n in nets.names()]):
        out = hook.fewstep_sample(ctx=ctx, nets=nets, noise=noise, cond=cond, num_steps=num_steps, generator=generator)
    if out is None:
        raise RuntimeError(f"no active plugin implements fewstep_sample for method {ctx.method.name!r}")
    return nets.teacher.decode(out.to(noise.dtype)).float().cpu()


@torch.no_grad()
def teacher_rows(teacher: Any, noise: Tensor, cond: Cond | None, vcfg: Any, guidance: float) -> dict[str, Tensor]:
    """The teacher's reference row of the validation grid (its usual multistep ODE sampler)."""
    images = teacher.sample(noise, cond, num_steps=vcfg.teacher_steps, solver=vcfg.teacher_solver,
                            guidance=guidance)
    return {f"teacher {vcfg.teacher_steps} steps": images.float().cpu()}
