"""Resolution cascades with one unified, low-resolution-conditioned denoiser (LowDiff, distribution.md §7).

A cascade is a list of model-space sizes ``resolutions = [r_0 < r_1 < ... < r_K]`` (r_K: the data size; latent
sizes for a latent teacher). Stage k generates at r_k, reading the previous stage's output up-sampled to r_k as
extra input channels (zeros at stage 0) and its stage index as a scalar input (``Backbone.add_scalar_inputs``),
so one fully convolutional backbone serves every stage and most sampling steps run at the cheap low sizes.

Which facts are the paper's and which are this implementation's choices: distribution.md §7 and docs/LOWDIFF.md.
Only the abstract of LowDiff could be read (one unified model; cascade of increasing resolutions; far fewer
high-resolution steps; pixel and latent space). Unverified here: the down-sampling operator (block average), the
up-sampling of the condition (nearest by default), the stage embedding, the noise augmentation of the condition
(the conditioning augmentation of Cascaded Diffusion Models, Ho et al. 2022, whose abstract calls it crucial),
starting higher stages from a noised up-sample, and the per-stage step split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from fewstep.diffusion import karras_sigmas, sample_ode
from fewstep.method_configs import check_resolutions  # import-light: lowdiff's config checks use it

__all__ = ["STAGE_EMBED_SCALE", "StageDenoiser", "StageSampler", "cascade_sample", "check_resolutions", "downsample", "lowres_condition",
           "pooled_noise", "stage_input", "stage_sigmas", "stage_steps", "upsample"]

#: The stage index k is fed to the zero-initialised scalar input ``stage`` as k * 250, through the backbone's own
#: timestep sinusoid (whose inputs span 0..1000), so stages 0..4 get well separated features. Stage 0 is fed 0,
#: the value a backbone assumes when the scalar is left out: any method that calls the network without
#: ``stage`` and with zero condition channels sees the stage-0 (lowest resolution, unconditional) model.
STAGE_EMBED_SCALE = 250.0

Upsampling = Literal["nearest", "bilinear"]
#: (x (B, C, r, r), sigma (B,), lowres (B, C, r, r), stage) -> x0 estimate (B, C, r, r), sigma space.
StageDenoiser = Callable[[Tensor, Tensor, Tensor, int], Tensor]
#: (noise (B, C, r, r) standard normal, condition (B, C, r, r)) -> the stage's sample (B, C, r, r): a distilled
#: student of one stage with its own sampler, in place of the ODE on the unified model.
StageSampler = Callable[[Tensor, Tensor], Tensor]


def downsample(x: Tensor, size: int) -> Tensor:
    """Block average of (B, C, H, W) to (B, C, size, size); H must be a multiple of ``size``."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] % size or x.shape[-2] % size:
        raise ValueError(f"downsample: {tuple(x.shape[-2:])} is not a multiple of {size}")
    return F.avg_pool2d(x, x.shape[-1] // size)


def upsample(x: Tensor, size: int, mode: Upsampling = "nearest") -> Tensor:
    """(B, C, h, w) -> (B, C, size, size): nearest repeats each pixel in a block (so ``downsample`` undoes it
    exactly); bilinear interpolates with aligned corners off (the diffusers/ PyTorch default)."""
    if x.shape[-1] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def pooled_noise(noise: Tensor, size: int) -> Tensor:
    """Standard normal noise at ``size`` from standard normal ``noise`` (B, C, H, W): the block average times the
    block width f (a mean of f^2 independent N(0, 1) has variance 1/f^2), so each sample keeps one noise draw."""
    f = noise.shape[-1] // size
    return downsample(noise, size) * f


def lowres_condition(x0: Tensor, resolutions: Sequence[int], stage: int, mode: Upsampling = "nearest") -> Tensor:
    """The condition channels of stage k from clean data x0 (B, C, R, R), training side: (B, C, r_k, r_k), the
    data block-averaged to r_{k-1} and up-sampled back to r_k; zeros at stage 0 (no condition)."""
    r = resolutions[stage]
    if stage == 0:
        return x0.new_zeros(x0.shape[0], x0.shape[1], r, r)
    return upsample(downsample(x0, resolutions[stage - 1]), r, mode)


def stage_input(stage: int | Tensor) -> Tensor:
    """The value fed to the backbone's ``stage`` scalar input for stage index k: k * STAGE_EMBED_SCALE."""
    return torch.as_tensor(stage, dtype=torch.float32) * STAGE_EMBED_SCALE


def stage_steps(num_steps: int, num_stages: int, ratio: float, overrides: dict[int, list[int]]) -> list[int]:
    """Steps per stage, lowest first: ``overrides[num_steps]`` when given (one count per stage), else
    ``num_steps`` at stage 0 and round(num_steps * ratio^k) (at least 1) at stage k."""
    if num_steps in overrides:
        steps = [int(n) for n in overrides[num_steps]]
        if len(steps) != num_stages or min(steps) < 1:
            raise ValueError(f"method.stage_steps[{num_steps}] = {steps}: give {num_stages} counts >= 1, lowest "
                             "resolution first")
        return steps
    return [max(1, round(num_steps * ratio**k)) for k in range(num_stages)]


def stage_sigmas(sampling_sigmas: Callable[[int], Tensor], num_steps: int, start_sigma: float | None,
                 sigma_min: float) -> Tensor:
    """The descending grid of one stage, (num_steps + 1,) ending in 0: the process's own ``num_steps`` grid from its
    sigma_max, or, when a later stage starts from a noised up-sample at ``start_sigma``, the first ``num_steps``
    levels of a (num_steps + 1)-level Karras grid from there to ``sigma_min`` (EDM Eq. 5), then 0.

    Why sigma_min is dropped: with it kept (a ``num_steps``-level Karras grid then 0, EDM's sampler grid) the last
    step runs from sigma_min to 0, a wasted evaluation, and the step before lands at sigma_min, where Heun's
    corrector applies the slope at sigma_min across the whole step: it moves the sample by (s - sigma_min) /
    (2 sigma_min) times the change of the denoiser's estimate. A 2-step stage from 2.0 on a teacher with sigma_min
    0.01 jumped 2.0 -> 0.01 and multiplied that change by 100 (samples of +-6 in [-1, 1] images). Without it, every
    stage ends with the Euler step into 0 from a level well above sigma_min (2.0 -> 0.23 -> 0 for 2 steps), as
    the SDEdit levels of fewstep.editing and the trailing grids of VP teachers do."""
    if start_sigma is None:
        return sampling_sigmas(num_steps)
    return torch.cat([karras_sigmas(num_steps + 1, sigma_min, start_sigma)[:-1], torch.zeros(1, dtype=torch.float64)])


def cascade_sample(denoise: StageDenoiser, noise: Tensor, resolutions: Sequence[int], steps: Sequence[int],
                   sampling_sigmas: Callable[[int], Tensor], *, solver: str = "heun", upsampling: Upsampling = "nearest",
                   cond_noise: float = 0.0, start_sigma: float | None = None, sigma_min: float = 0.002,
                   generator: torch.Generator | None = None, students: Mapping[int, StageSampler] | None = None) -> Tensor:
    """Generate stage by stage, lowest resolution first; returns (B, C, R, R) model-space samples.

    noise: (B, C, R, R) standard normal at the top size R; stage 0 starts from its block average
    (:func:`pooled_noise`), later stages from fresh noise drawn from ``generator``. Stage k > 0 reads the previous
    output up-sampled to r_k, plus ``cond_noise`` * N(0, I) (the training-time augmentation), and starts from pure
    noise at the grid's top, or from the up-sample noised to ``start_sigma`` when given. steps: ODE steps per
    stage (``solver``: euler / ddim / heun, as ``fewstep.diffusion.sample_ode``). students: stage k -> a sampler
    that maps the stage's noise and condition (both (B, C, r_k, r_k); the condition is zeros at stage 0) to its
    sample instead of the ODE (a distilled student of that stage); such a stage starts from its noise, whatever
    ``start_sigma``."""
    if len(steps) != len(resolutions):
        raise ValueError(f"cascade_sample: {len(steps)} step counts for {len(resolutions)} stages")
    students = students or {}
    x = None
    for k, (r, n) in enumerate(zip(resolutions, steps)):
        if k == 0:
            eps = pooled_noise(noise, r)
            low = torch.zeros_like(eps)
        else:
            eps = torch.randn((noise.shape[0], noise.shape[1], r, r), generator=generator).to(noise)
            low = upsample(x, r, upsampling)
            if cond_noise > 0:
                low = low + cond_noise * torch.randn(low.shape, generator=generator).to(low)
        if k in students:
            x = students[k](eps, low)
            continue
        sigmas = stage_sigmas(sampling_sigmas, n, start_sigma if k > 0 else None, sigma_min).to(noise.device)
        start = eps * sigmas[0] if k == 0 or start_sigma is None else upsample(x, r, upsampling) + eps * sigmas[0]
        x = sample_ode(lambda x_, s, low=low, k=k: denoise(x_, s, low, k), start.float(), sigmas, solver)
    assert x is not None
    return x
