"""f-distill, method ``fdistill`` (Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution
Matching", 2025, arXiv:2502.15681): DMD2 (specs/distribution.md §2) with the distribution-matching step of each
sample weighted by h(r) = f''(r)·r², r = p/q the density ratio of the teacher's (data's) and the generator's
noisy marginals at the sample, so that the generator minimises an f-divergence instead of the reverse KL.

Everything but the weight is DMD2 as in ``fewstep.distribution``: a one- or multistep generator (the student),
a fake score (a trainable copy of the teacher) with the teacher's own denoising loss, TTUR (the critic every
step, the generator every ``ratio``), and the non-saturating GAN head on the fake score's bottleneck, trained
on real images against generator samples, both diffusion-noised. The GAN head is also the ratio estimator: at
its optimum its logit is log p/q, so r = exp(logit) is read at the very noisy point x_t where L_DM evaluates
the scores (as FastGen's f-distill does). The weights are normalised as FastGen does (``fewstep.distribution
.f_weights``): r by its mean within noise-level bins, then h by its batch mean. ``reverse_kl`` has h = 1 and
is DMD2 exactly (tests/test_fdistill.py checks the gradients are equal).

Facts: the weighting h(r) = f''(r)·r² and the divergences with their f are derived here and agree with NVIDIA
FastGen's f-distill implementation (its defaults: JS, r clipped to [0.1, 20], 10 bins); the paper's own
tables and hyper-parameters were not read [UNVERIFIED]. Departures: the normalisations use the batch the loss
hook sees (FastGen: the global batch, and an optional EMA of the bin means); the ratio is read by one extra
bottleneck pass of the frozen critic (no gradient) rather than reusing the GAN term's logits, which DMD2's
generator term draws at its own noise level.

Costs per trainer step: DMD2's (plugins/dmd.py), plus one bottleneck forward of the critic without gradient
in each generator turn.
"""

from __future__ import annotations

import copy

import torch
from fewstep_plugins.fdistill_config import FDistillConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.distribution import (
    Players,
    Schedule,
    bottleneck_critic,
    critic_objective,
    denoiser,
    f_weights,
    few_step_sample,
    generator_objective,
    method_levels,
    optimizer_groups,
    probe_cond,
)
from fewstep.gan import head_for
from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    """``fake_score`` (a copy of the student, which holds the teacher's fp32 weights) and ``gan_head`` (sized by
    a dry run of the fake score's bottleneck), as DMD2."""
    fake = copy.deepcopy(student).requires_grad_(True)
    return {"fake_score": fake, "gan_head": head_for(fake, teacher.sample_shape, probe_cond(teacher))}


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    return optimizer_groups(ctx, ("student",), ("fake_score", "gan_head"))


def players(ctx: RunContext, nets: Nets, batch: Batch) -> Players:
    """DMD2's networks bound to the batch's conditions; guidance (CFG or autoguidance) on the real score only."""
    teacher, process = nets.teacher, nets.teacher.process
    g = ctx.method.real_guidance if ctx.method.real_guidance is not None else ctx.config.teacher.guidance

    def real(x: Tensor, sigma: Tensor) -> Tensor:
        return teacher.denoise(x, sigma, batch.cond, uncond=batch.uncond, guidance=g)

    fake = nets.extra["fake_score"]
    return Players(denoiser(process, nets.student, batch.cond), real, denoiser(process, fake, batch.cond),
                   bottleneck_critic(process, fake, nets.extra["gan_head"], batch.cond))


def level_bins(sched: Schedule, sigma: Tensor, num_bins: int) -> Tensor:
    """(B,) bin of each L_DM level: its grid index within sched.dm cut into ``num_bins`` equal parts."""
    lo, hi = sched.dm
    index = torch.searchsorted(sched.grid.to(sigma.device), sigma.contiguous()).clamp(lo, hi)
    return ((index - lo) * num_bins // (hi - lo + 1)).clamp(max=num_bins - 1)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Critic turn: DMD2's (L_denoise + lambda_D L_D). Generator turn: h(r)-weighted L_DM + lambda_G L_G."""
    cfg, process = ctx.method, nets.teacher.process
    sched = Schedule.of(cfg, process)
    p = players(ctx, nets, batch)
    shape = nets.teacher.sample_shape
    if group.name == "critic":
        loss, terms = critic_objective(cfg, sched, p, process, shape, step, x_real=batch.x0)
        return LossOutput(loss=loss, terms=terms)
    seen: dict[str, Tensor] = {}

    def weight(x_t: Tensor, sigma: Tensor) -> Tensor:
        logits = p.critic(x_t, sigma).float()
        bins = level_bins(sched, sigma, cfg.ratio_bins) if cfg.ratio_bins else None
        w = f_weights(cfg.divergence, logits, ratio_clip=cfg.ratio_clip, bins=bins, num_bins=cfg.ratio_bins)
        seen.update(log_ratio=logits.mean(), weight_min=w.min(), weight_max=w.max())
        return w

    loss, terms = generator_objective(cfg, sched, p, shape, step, x_real=batch.x0,
                                      gan_weight=cfg.gan_generator_weight, weight=weight)
    return LossOutput(loss=loss, terms={**terms, **seen})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """DMD2's sampler with ``num_steps`` levels of the training grid (1: one call at sigma_max)."""
    cfg, process = ctx.method, nets.teacher.process.for_sampler()  # the teacher scheduler's x0 bound
    levels = method_levels(cfg, Schedule.of(cfg, process).grid, num_steps)
    return few_step_sample(denoiser(process, sampling_net(nets), cond), noise, levels, generator)
