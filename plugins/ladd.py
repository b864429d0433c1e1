"""Adversarial distillation with a discriminator on the frozen teacher's features: methods ``ladd`` (Sauer et al.,
"Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation", 2024, arXiv:2403.12015)
and ``add`` (Sauer et al., "Adversarial Diffusion Distillation", 2023, arXiv:2311.17042). Background in
specs/distribution.md §9 (ADD facts there are [R]).

Networks: the student (a copy of the teacher) is the generator, called at DMD2's generator levels
(``fewstep.distribution``: one step at sigma_max, or N levels of the training grid); ``disc_head`` holds
trainable heads (``fewstep.gan.LevelHeads`` or a ``BottleneckHead``) on the *frozen teacher's* features. The
discriminator D(x, sigma) = head(teacher features at x + sigma·eps) reads samples re-noised to a level drawn as
log sigma ~ N(renoise_mean, renoise_std²), i.e. LADD's logit-normal over flow time t = sigma/(1 + sigma),
clipped to the teacher's range; generator samples and real samples are re-noised independently. The teacher's
weights never train; the generator's adversarial gradient flows through them into its samples. Hinge loss
(relu(1 - D(real)) + relu(1 + D(fake)); generator -D(fake)), both papers' choice [R]. Two optimizer groups:
``generator`` every ``ratio`` steps, ``disc`` every step.

- ``ladd``: the adversarial loss only. Real samples are the teacher's own images from the pair store
  (``data.pairs``; LADD trains on teacher-generated data) or the data set (``real: data``).
- ``add``: the adversarial loss plus lambda times ADD's score-distillation term c(t)·||x - sg(D_teacher(x + sigma·eps))||²
  on the student's sample x re-noised at a level uniform over the teacher's grid, c = alpha_bar = 1/(1 + sigma²)
  (ADD's "exponential" weighting [R]), lambda = 2.5 [R]; real samples from the data set.
Multistep students (``num_steps`` > 1) train at level k > 0 on real samples noised there (ADD's student inputs;
``backward_simulation: true`` uses the student's own k-step outputs as DMD2 does) and sample with DMD2's
re-noising sampler. The first level reads pure noise (``first_input: noise``, what the sampler gives it) or, as
ADD's student at timestep 999, real samples noised there (``first_input: real``).

Heads: by default (``gan_heads: levels``) one per feature level of the teacher, LADD's independent heads (UNets:
the mid and every up block, where LADD has one per transformer block; transformers: every block), each with its
own hinge loss, averaged over heads (LADD's reduction over heads is not verified); ``gan_heads: bottleneck``: one
head on the bottleneck (the UNet mid block / DiT last block), which runs only the encoder. ``gan_head_grid`` g > 1
gives every head a g x g grid of patch logits, each cell with its own hinge loss (ADD's heads, StyleGAN-T's, give
one logit per feature token [R]; here the cells are coarsened to g x g so every level weighs the same).

Departures: for ADD the teacher's noisy features instead of a frozen DINOv2 on clean pixels (a download); ADD's
R1 penalty on real data is off by default and, where on (``r1_weight``), approximated (the change of D under a
small perturbation of its real, re-noised input, APT's; ``fewstep.gan.approximate_r1``); ADD's
text/image-embedding conditioning of the heads is the teacher's own conditioning of its features.

Costs per trainer step (B samples): disc turn 1 student forward (no grad) + 2 teacher forwards (encoder only with
``gan_heads: bottleneck``; no grad through the teacher's weights; a third with ``r1_weight``) + head
forward/backward; generator turn 1 student forward/backward + 1 teacher forward/backward through the frozen
teacher; ``add`` adds 1 teacher forward (2 with CFG).
"""

from __future__ import annotations

import torch
from fewstep_plugins.ladd_config import (  # noqa: F401 - re-exported from the config module
    MIN_REAL_INPUT_SIGMA,
    ADDConfig,
    LADDConfig,
    _Adversarial,
    fewstep_configure,
    fewstep_method_config,
)
from torch import Tensor, nn

from fewstep.diffusion import X0Clip, append_dims, lognormal_sigmas
from fewstep.distribution import (
    Critic,
    Denoiser,
    denoiser,
    few_step_sample,
    generator_levels,
    optimizer_group,
    simulate,
    simulation_steps,
    training_sigmas,
)
from fewstep.gan import (
    approximate_r1,
    discriminator_loss,
    generator_loss,
    head_logits,
    make_head,
    probe_cond,
)
from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    """``disc_head``: one head per feature level of the teacher, or one on its bottleneck (``gan_heads``), sized
    by a dry run; the teacher stays frozen."""
    head = make_head(teacher.net, teacher.sample_shape, probe_cond(teacher), ctx.method.gan_heads,
                     ctx.method.gan_head_grid)
    return {"disc_head": head.float()}


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    cfg = ctx.method
    return [optimizer_group(ctx, "generator", ("student",), every_n_steps=cfg.ratio),
            optimizer_group(ctx, "disc", ("disc_head",), lr=cfg.disc_lr)]


def teacher_critic(nets: Nets, cond: Cond | None) -> Critic:
    """D(x, sigma) = head(frozen teacher's bottleneck at the sigma-space point (x, sigma)), logits (B,); with
    ``gan_heads: levels`` one head per feature level, logits (B, L); with ``gan_head_grid`` g > 1 each head's g²
    patch logits."""
    teacher, head = nets.teacher, nets.extra["disc_head"]
    cast = None if cond is None else cond.to(teacher.device, teacher.dtype)

    def critic(x: Tensor, sigma: Tensor) -> Tensor:
        inputs, timestep = teacher.process.network_inputs(x, sigma)
        return head_logits(head, teacher.net, inputs.to(teacher.dtype), timestep, cast).float()

    return critic


def renoise_levels(cfg: _Adversarial, process, step: StepInfo) -> Tensor:
    """(B,) levels with log sigma ~ N(renoise_mean, renoise_std²), clipped to the teacher's range."""
    sigma = step.draw(lambda n, g: lognormal_sigmas(n, cfg.renoise_mean, cfg.renoise_std, g))
    return sigma.clamp(process.sigma_min, process.sigma_max).float().to(step.device)


def renoised_logits(critic: Critic, x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Discriminator logits (B,) of x (B, C, H, W) re-noised to x + sigma·eps."""
    return critic(x.float() + append_dims(sigma, x.ndim) * eps, sigma)


def distill_loss(x: Tensor, teacher: Denoiser, sigma: Tensor, eps: Tensor, weighting: str) -> Tensor:
    """ADD's distillation term per sample (B,): c(sigma)·mean (x − sg(D_teacher(sg(x) + sigma·eps)))²; its
    gradient in x is 2 c (x − target)/(C·H·W), a score-distillation step towards the teacher's denoising."""
    with torch.no_grad():
        target = teacher(x.detach().float() + append_dims(sigma, x.ndim) * eps, sigma).float()
    c = 1.0 / (1.0 + sigma.float() ** 2) if weighting == "alpha_bar" else torch.ones_like(sigma.float())
    return c * (x.float() - target).square().flatten(1).mean(1)


def real_samples(cfg: _Adversarial, batch: Batch) -> tuple[Tensor, Cond | None]:
    if cfg.real == "pairs":
        if batch.pairs is None:
            raise ValueError(f"method {cfg.name}: real 'pairs' needs data.pairs (a `fewstep pairs` store)")
        return batch.pairs[1].float(), batch.pair_cond
    if batch.x0 is None:
        raise ValueError(f"method {cfg.name}: real 'data' needs images, but the data source has none; use an "
                         "image data source or set method.real: pairs")
    return batch.x0.float(), batch.cond


def generate(cfg: _Adversarial, levels: Tensor, student: Denoiser, x_real: Tensor, step: StepInfo,
             bound: X0Clip) -> Tensor:
    """Student samples (B, C, H, W) from level k's input: at k = 0 pure noise (``first_input: noise``) or real
    samples noised there (``real``, ADD); at k > 0 real samples noised there, or the student's own k steps
    (backward simulation, its x0s bounded by ``bound``, the teacher scheduler's x0 clip, as the sampler bounds
    them: ``fewstep.distribution.simulate``)."""
    z = step.randn(*x_real.shape[1:])
    k = simulation_steps(step, levels.numel())
    noised_real = cfg.first_input == "real" if k == 0 else not cfg.backward_simulation
    if not noised_real:
        x_in, sigma = simulate(student, z, levels, k, step, bound)
    else:
        sigma = levels[k].expand(z.shape[0]).to(z.device)
        x_in = x_real + append_dims(sigma, z.ndim) * z
    return student(x_in, sigma)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """disc: hinge (or non-saturating) loss on re-noised real vs student samples. generator: the adversarial
    loss of its re-noised samples through the frozen teacher and head (+ lambda·distillation for ``add``)."""
    cfg, process = ctx.method, nets.teacher.process
    grid = training_sigmas(process)
    levels = generator_levels(grid, cfg.num_steps, cfg.sigma_max)
    x_real, real_cond = real_samples(cfg, batch)
    cond = real_cond  # student samples share the real samples' conditions, so D compares like with like
    student = denoiser(process, nets.student, cond)
    critic = teacher_critic(nets, cond)
    if group.name == "disc":
        with torch.no_grad():
            fake = generate(cfg, levels, student, x_real, step, process.x0_clip).float()
        real_sigma = renoise_levels(cfg, process, step)
        real_in = x_real + append_dims(real_sigma, x_real.ndim) * step.randn_like(x_real)
        real_logits = critic(real_in, real_sigma)
        fake_logits = renoised_logits(critic, fake, renoise_levels(cfg, process, step), step.randn_like(fake))
        loss = discriminator_loss(real_logits, fake_logits, cfg.gan_loss)
        terms = {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        if cfg.r1_weight > 0:
            r1 = approximate_r1(lambda x: critic(x, real_sigma), real_in, real_logits, step.randn_like(real_in),
                                cfg.r1_std)
            loss = loss + 0.5 * cfg.r1_weight * r1
            terms["r1"] = r1.detach().mean()
        return LossOutput(loss=loss, terms=terms)
    x = generate(cfg, levels, student, x_real, step, process.x0_clip).float()
    adv = generator_loss(renoised_logits(critic, x, renoise_levels(cfg, process, step), step.randn_like(x)),
                         cfg.gan_loss)
    terms = {"adv": adv.detach().mean()}
    loss = adv
    if cfg.name == "add" and cfg.distill_weight > 0:
        g = cfg.real_guidance if cfg.real_guidance is not None else ctx.config.teacher.guidance
        uncond = batch.uncond if cond is batch.cond else None  # None: the teacher's null condition
        teacher = lambda x_t, s: nets.teacher.denoise(x_t, s, cond, uncond=uncond, guidance=g)  # noqa: E731
        lo, hi = (min(round(f * grid.numel()), grid.numel() - 1) for f in cfg.distill_t_range)
        sigma = grid.to(step.device)[step.randint(lo, hi + 1)]
        dist = distill_loss(x, teacher, sigma, step.randn_like(x), cfg.distill_weighting)
        loss = loss + cfg.distill_weight * dist
        terms["distill"] = dist.detach().mean()
    return LossOutput(loss=loss, terms=terms)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """DMD2's re-noising sampler over ``num_steps`` levels of the training grid (1: one call at sigma_max)."""
    process = nets.teacher.process.for_sampler()  # the teacher scheduler's x0 bound
    levels = generator_levels(training_sigmas(process), num_steps, ctx.method.sigma_max)
    return few_step_sample(denoiser(process, sampling_net(nets), cond), noise, levels, generator)
