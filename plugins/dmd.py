"""Distribution Matching Distillation: ``dmd`` (Yin et al., CVPR 2024) and ``dmd2`` (Yin et al., NeurIPS
2024). Maths: specs/distribution.md §1 (DMD), §2 (DMD2), §9 (the GAN term), §0.1 notation; the shared
pieces live in ``fewstep.distribution``.

Networks: the student is the generator, a copy of the teacher called at the generator levels (one
step: once at sigma_max); ``fake_score`` is a second copy of the teacher, trained as the critic; DMD2's
``gan_head`` classifies the fake score's bottleneck features. Two optimizer groups, as data: the
generator every ``ratio`` steps and the critic every step (TTUR, §2.4).

- ``dmd``: one-step generator, L_DM plus lambda_reg times a regression of G(z_ref) onto the teacher's ODE
  solution y_ref from a pair store (``data.pairs``, made by ``fewstep pairs``, §1.4). LPIPS needs a
  downloaded VGG, so the regression distance is L2 (or pseudo-Huber), on model-space samples: a
  departure from the paper (§1.4), which also weakens the regression's pull towards sharp images.
- ``dmd2``: no regression; TTUR; the non-saturating GAN on real images, both sides diffusion-noised;
  a multistep generator with backward simulation (``num_steps``), sampled with 1 to N steps.

Costs per trainer step (B samples): critic turn 1 G forward (no grad), 1 fake-score forward + backward,
with the GAN 2 bottleneck forwards + backward; generator turn (every ``ratio`` steps) G forward +
backward, 1 teacher forward (2 with CFG), 1 fake forward (no grad), with the GAN 1 bottleneck forward +
backward through the frozen critic; backward simulation adds up to N-1 G forwards (no grad) per turn
(``fake_score_per_level``: the critic turn always N-1, its batch spanning every level).
Each turn draws its own generator samples: where DMD2 reuses the generator turn's samples for the critic
(§2.7 step 5), fewstep spends one more G forward every ``ratio`` steps and keeps the loss hook stateless.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from fewstep_plugins.dmd_config import DMD2Config, DMDConfig, fewstep_configure, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.distribution import (
    Players,
    Schedule,
    bottleneck_critic,
    critic_names,
    critic_objective,
    denoiser,
    few_step_sample,
    generator_objective,
    levels_per_sample,
    method_levels,
    optimizer_groups,
    probe_cond,
    routed,
    simulation_steps,
)
from fewstep.gan import make_head
from fewstep.hookspecs import hookimpl
from fewstep.losses import distance
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo


def critics(cfg) -> list[tuple[str, str]]:
    """(fake score, GAN head) names: one pair, or one per generator level (``fake_score_per_level``)."""
    return critic_names(cfg.num_steps if getattr(cfg, "fake_score_per_level", False) else 1)


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    """``fake_score``: copied from the student, which at this point holds the teacher's fp32 weights (the
    teacher itself is already in the compute dtype). ``gan_head``: sized by a dry run of the fake score.
    With ``fake_score_per_level``, ``fake_score_k`` and ``gan_head_k`` for levels k = 1..N-1 as well."""
    pairs = critics(ctx.method)
    if len(pairs) > 1 and ctx.local_batch < len(pairs):
        raise ValueError(f"method.fake_score_per_level: every critic turn shares its batch out among the "
                         f"{len(pairs)} levels, but a micro-batch holds {ctx.local_batch} samples (train.batch_size "
                         f"{ctx.global_batch} / accumulation / {ctx.world_size} processes); make it at least "
                         f"{len(pairs)}")
    nets: dict[str, nn.Module] = {}
    for fake_name, head_name in pairs:
        fake = nets[fake_name] = copy.deepcopy(student).requires_grad_(True)
        if ctx.method.adversarial:
            nets[head_name] = make_head(fake, teacher.sample_shape, probe_cond(teacher), ctx.method.gan_heads,
                                         ctx.method.gan_head_grid)
    return nets


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    pairs = critics(ctx.method)
    critic = tuple(f for f, _ in pairs) + (tuple(h for _, h in pairs) if ctx.method.adversarial else ())
    return optimizer_groups(ctx, ("student",), critic)


def players(ctx: RunContext, nets: Nets, cond: Cond, uncond: Cond | None, level: int = 0) -> Players:
    """The turn's networks for one batch of conditions; CFG (or autoguidance) on the real score only.
    ``level``: the generator level whose fake score and head play (with ``fake_score_per_level``)."""
    teacher, process = nets.teacher, nets.teacher.process
    g = ctx.method.real_guidance if ctx.method.real_guidance is not None else ctx.config.teacher.guidance

    def real(x: Tensor, sigma: Tensor) -> Tensor:
        return teacher.denoise(x, sigma, cond, uncond=uncond, guidance=g)

    pairs = critics(ctx.method)
    fake, critic = _critic_pair(ctx, nets, pairs[level if len(pairs) > 1 else 0], cond)
    return Players(denoiser(process, nets.student, cond), real, fake, critic)


def _critic_pair(ctx: RunContext, nets: Nets, names: tuple[str, str], cond: Cond | None):
    """(fake score denoiser, GAN critic or None) of one (fake score, head) pair, bound to ``cond``."""
    process, fake = nets.teacher.process, nets.extra[names[0]]
    critic = bottleneck_critic(process, fake, nets.extra[names[1]], cond) if ctx.method.adversarial else None
    return denoiser(process, fake, cond), critic


def level_players(ctx: RunContext, nets: Nets, cond: Cond | None, uncond: Cond | None, ks: Tensor,
                  device: torch.device) -> Players:
    """The critic turn's networks with ``fake_score_per_level``: sample i's generator output is at level
    ``ks[i]`` (:func:`levels_per_sample`), and its fake score and GAN head are that level's, so every level's
    pair trains on its share of every critic turn."""
    parts = []
    for level, names in enumerate(critics(ctx.method)):
        rows = (ks == level).nonzero().squeeze(1).to(device)
        parts.append((rows, _critic_pair(ctx, nets, names, cond.index(rows) if cond is not None else None)))
    critic = routed([(rows, pair[1]) for rows, pair in parts]) if ctx.method.adversarial else None
    return dataclasses.replace(players(ctx, nets, cond, uncond), fake=routed([(r, pair[0]) for r, pair in parts]),
                               critic=critic)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Generator turn: L_DM (+ lambda_reg L_reg for dmd, + lambda_G L_G for dmd2). Critic turn: L_denoise
    (+ lambda_D L_D), on this turn's own detached generator samples."""
    cfg, process = ctx.method, nets.teacher.process
    sched = Schedule.of(cfg, process)
    per_level = len(critics(cfg)) > 1
    shape = nets.teacher.sample_shape
    if group.name == "critic":
        # per-level critics: the batch is shared out among the levels, so every level's pair trains each turn
        ks = levels_per_sample(step, cfg.num_steps) if per_level else None
        p = (level_players(ctx, nets, batch.cond, batch.uncond, ks, step.device) if per_level
             else players(ctx, nets, batch.cond, batch.uncond))
        loss, terms = critic_objective(cfg, sched, p, process, shape, step, x_real=batch.x0, k=ks)
        return LossOutput(loss=loss, terms=terms)
    # the generator turn's level is drawn first, so that level's fake score and head play it
    k = simulation_steps(step, cfg.num_steps) if per_level else None
    p = players(ctx, nets, batch.cond, batch.uncond, level=k or 0)
    loss, terms = generator_objective(cfg, sched, p, shape, step, x_real=batch.x0,
                                      gan_weight=cfg.gan_generator_weight, k=k)
    if cfg.name == "dmd" and cfg.regression_weight > 0:
        z_ref, y_ref = batch.pairs
        x_ref = denoiser(process, nets.student, batch.pair_cond)(z_ref * sched.levels[0], sched.levels[0])
        reg = distance(x_ref.float(), y_ref, cfg.regression_distance)
        loss = loss + cfg.regression_weight * reg
        terms["regression"] = reg.detach().mean()
    return LossOutput(loss=loss, terms=terms)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator) -> Tensor:
    """DMD2's sampler with ``num_steps`` levels of the training grid (1: one call at sigma_max); levels off
    the trained ones (k not dividing ``method.num_steps``) are the student's extrapolation."""
    cfg, process = ctx.method, nets.teacher.process.for_sampler()  # x0 bounded as the export's LCMScheduler does
    grid = Schedule.of(cfg, process).grid
    levels = method_levels(cfg, grid, num_steps)
    return few_step_sample(denoiser(process, sampling_net(nets), cond), noise, levels, generator)


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """DMD2's sampler predicts x0 and re-noises with fresh noise at the next generator level: the stock
    ``renoise_sampler`` at the same levels (VP: LCMScheduler at timesteps 999, 749, ... for N = 4; flow:
    FlowMatchLCMScheduler)."""
    from fewstep.export import renoise_sampler

    cfg, process = ctx.method, nets.teacher.process
    grid = Schedule.of(cfg, process).grid
    return renoise_sampler(process, method_levels(cfg, grid, num_steps))


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """The generator's x0 prediction G(x, sigma) as the map of fewstep.editing's sampler, with the generator
    levels as its N-step levels and re-noising from 0: on those levels the editing sampler with nothing known
    is DMD2's multistep sampler (``few_step_sample``), so ``fewstep edit --task img2img`` is the stock
    img2img / inpainting pipelines' rule on this sampler (docs/EDITING.md). Other levels (``--task sdedit``'s
    Karras points) are the generator's extrapolation, as sampling with a step count off its grid."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, process = ctx.method, nets.teacher.process.for_sampler()
    grid = Schedule.of(cfg, process).grid
    top = float(method_levels(cfg, grid, 1)[0])
    return ConsistencyDenoiser(denoiser(process, sampling_net(nets), cond), float(grid[0]), top, renoise_floor=0.0,
                               levels=lambda n: method_levels(cfg, grid, n).tolist())
