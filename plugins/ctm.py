"""Consistency Trajectory Models (``ctm``; Kim et al. 2023, sony/ctm). Maths: specs/consistency.md §7.

The student G_theta(x_t, t, s) jumps from any level t to any s <= t along the teacher's PF-ODE. In
sigma space (``fewstep.diffusion``: x = x0 + sigma * eps) CTM's "euler" outer parameterisation is

    G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s)                                        (§7.1)

with g the backbone's sigma-space denoiser (``NoiseProcess.denoise``) given the target time s as an
extra zero-initialised input (``Backbone.add_scalar_inputs(["s"])``, s in model-time units). So the
same code serves VP, EDM and flow teachers, G(x, t, t) = x holds bit for bit, and at step 0 the
student's jump is a DDIM step of its teacher. g(x, t, t) is a denoiser, trained by the DSM term.

Training (§7.2-7.6): soft consistency matching between the student's estimate from x_t and its
stop-gradient estimate from x_u, a point k teacher Heun steps closer to data, both mapped to sigma_min
by the target network theta^- (an EMA with mu = 0.999, separate from the evaluation EMA); plus DSM;
plus, in an optional second phase, a GAN term against a diffusion discriminator (``fewstep.gan``).
Sampling is CTM's gamma-sampler (§7.8). LPIPS is not offered: its VGG weights are a download.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from fewstep_plugins.ctm_config import CTMConfig, fewstep_configure, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.diffusion import append_dims, heun_step, karras_sigmas
from fewstep.gan import (
    DiffusionDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    output_layer,
    probe_cond,
)
from fewstep.hookspecs import hookimpl
from fewstep.losses import distance
from fewstep.nn import ema_update, frozen_copy, same_dropout
from fewstep.sampling import sampler_sigmas, sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

Jump = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x (B,C,H,W), t (B,), s (B,)) -> G(x, t, s)


# ---------------------------------------------------------------------------------------------
# The (t, s) student


def s_input(process, s: Tensor) -> Tensor:
    """The target time s (B,) as the backbone's scalar input: model-time units (Backbone convention)."""
    return process.model_time(process.sigma_to_t(s))


def jump(net: nn.Module, process, x: Tensor, t: Tensor, s: Tensor, cond: Cond | None) -> Tensor:
    """G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s) (§7.1, "euler"). x: (B, C, H, W); t, s: (B,) sigmas.

    s = t gives x exactly: s/t = 1 and (1 - 1) g = 0 in floating point."""
    g = process.denoise(net, x, t, cond, s=s_input(process, s))
    r = append_dims((s / t).to(x.dtype), x.ndim)
    return r * x + (1 - r) * g


def _range(cfg: CTMConfig, process) -> tuple[float, float]:
    return (cfg.sigma_min or process.sigma_min, cfg.sigma_max or process.sigma_max)


def karras_at(u: Tensor, lo: float, hi: float, rho: float) -> Tensor:
    """The continuous Karras schedule sigma(u) = (hi^(1/rho) + u (lo^(1/rho) - hi^(1/rho)))^rho, u in [0, 1]."""
    a, b = hi ** (1.0 / rho), lo ** (1.0 / rho)
    return (a + u * (b - a)) ** rho


# ---------------------------------------------------------------------------------------------
# Training levels: pure functions of the step's random draws


def heun_step_probs(k_max: int) -> Tensor:
    """P(k) ∝ k on k = 1..K_max (§7.2, heun_step_strategy='weighted'): (K_max,), entry k-1 is P(k)."""
    k = torch.arange(1, k_max + 1, dtype=torch.float64)
    return (k / k.sum()).float()


def ctm_levels(step: StepInfo, num_scales: int, k_max: int) -> tuple[int, Tensor, Tensor]:
    """Grid indices of one batch (§7.2): k ~ P(k) ∝ k, one per step (num_heun_step is one integer per
    iteration in sony/ctm, [UNVERIFIED] reading); per sample n ~ U{0..N-1-k} (t = t(n), u = t(n + k))
    and m ~ U{n+k..N-1} (s = t(m), so sigma_min <= s <= u). Returns (k, n (B,), m (B,))."""
    probs = heun_step_probs(k_max)
    k = int(step.draw(lambda b, g: torch.multinomial(probs, 1, generator=g).expand(b))[0]) + 1
    n = step.randint(0, num_scales - k)
    m = (n + k + (step.rand() * (num_scales - n - k)).floor().long()).clamp(max=num_scales - 1)
    return k, n, m


def dsm_sigmas(step: StepInfo, cfg: CTMConfig, lo: float, hi: float) -> Tensor:
    """(B,) DSM levels (§7.4): a 50/50 mixture, per sample, of ln sigma ~ N(P_mean, P_std^2) and the Karras
    schedule at u ~ U[0, 0.7]; clamped to [sigma_min, sigma_max] so every teacher can embed them."""
    lognormal = torch.exp(cfg.dsm_p_mean + cfg.dsm_p_std * step.randn())
    karras = karras_at(step.rand() * cfg.dsm_karras_fraction, lo, hi, cfg.rho)
    return torch.where(step.rand() < 0.5, lognormal, karras).clamp(lo, hi)


def gan_sigmas(step: StepInfo, cfg: CTMConfig, lo: float, hi: float) -> Tensor:
    """(B,) diffusion-GAN noise levels: the continuous Karras schedule at u ~ U[0, 1] up to gan_sigma_max."""
    return karras_at(step.rand(), lo, cfg.gan_sigma_max or hi, cfg.rho)


def karras_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (§7.4, EDM's weight)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ---------------------------------------------------------------------------------------------
# Loss pieces


@torch.no_grad()
def teacher_solve(teacher, grid: Tensor, x: Tensor, n: Tensor, k: int, batch: Batch, guidance: float) -> Tensor:
    """x_u = Heun_phi(x_t; t(n) -> t(n + k)): k teacher Heun steps along the training grid (§7.3 step 2),
    2k teacher evaluations. CTM's teacher is unguided; ``guidance`` (teacher.guidance) 1 keeps it so."""

    def denoise(x_: Tensor, sigma: Tensor) -> Tensor:
        return teacher.denoise(x_, sigma, batch.cond, uncond=batch.uncond, guidance=guidance)

    for j in range(k):
        x = heun_step(denoise, x, grid[n + j], grid[n + j + 1])
    return x


def estimate_and_target(student: nn.Module, target: nn.Module, process, x_t: Tensor, x_u: Tensor, t: Tensor,
                        u: Tensor, s: Tensor, eps: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor]:
    """§7.3 steps 3-4: x_est = G_target(G_theta(x_t, t, s), s, eps), the gradient reaching theta through the
    target network's input only (its parameters are frozen); x_tgt = sg[G_target(G_sg(theta)(x_u, u, s), s,
    eps)] with the current online weights under no_grad (sony/ctm ``model_sg``). Both pairs of passes see
    the same dropout masks. Shapes: x (B, C, H, W), levels (B,). The no-grad pair runs first (as in plugins/cm.py):
    its intermediates are freed before the estimate keeps its own for the backward; the values are the same."""
    with same_dropout(), torch.no_grad():
        tgt = jump(target, process, jump(student, process, x_u, u, s, cond), s, eps, cond)
    est = jump(target, process, jump(student, process, x_t, t, s, cond), s, eps, cond)
    return est, tgt


def dsm_loss(student: nn.Module, process, x0: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float,
             cond: Cond | None) -> Tensor:
    """lambda(sigma) ||g(x_sigma, sigma, sigma) - x0||^2 per sample (§7.4; mean over pixels), (B,)."""
    x = x0 + append_dims(sigma, x0.ndim) * noise
    g = process.denoise(student, x, sigma, cond, s=s_input(process, sigma))
    return karras_weight(sigma, sigma_data) * (g.float() - x0).flatten(1).square().mean(1)


def disc_logits(disc: nn.Module, process, x: Tensor, sigma: Tensor, noise: Tensor, cond: Cond | None) -> Tensor:
    """D(x + sigma z) (B,): the diffusion discriminator reads the noised sample as the teacher would."""
    x_in, timestep = process.network_inputs(x + append_dims(sigma, x.ndim) * noise, sigma)
    return disc(x_in, timestep, cond)


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    """A copy of the teacher with the target-time input s (zero-initialised: G starts as DDIM steps)."""
    student = copy.deepcopy(teacher.net).float()
    student.add_scalar_inputs(["s"])
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    nets: dict[str, nn.Module] = {"target": frozen_copy(student).float()}
    if ctx.method.gan_start_nimg is not None:
        nets["disc"] = DiffusionDiscriminator(teacher.net, teacher.sample_shape, probe_cond(teacher))
    return nets


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup] | None:
    cfg, o = ctx.method, ctx.config.optimizer
    if cfg.gan_start_nimg is None:
        return None  # the core default: one `student` group from the optimizer section
    student = OptimizerGroup.from_recipe(o)
    disc = OptimizerGroup("disc", ("disc",), lr=cfg.disc_lr, optimizer="adam", betas=tuple(cfg.disc_betas),
                          every_n_steps=cfg.disc_every_n_steps)
    return [student, disc]


@hookimpl
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase]:
    """`ctm` (student: CTM + DSM), then optionally `gan` (discriminator, then student with the GAN term)."""
    cfg = ctx.method
    if cfg.gan_start_nimg is None:
        return [Phase("ctm", ("student",), duration_nimg=None)]
    return [Phase("ctm", ("student",), duration_nimg=cfg.gan_start_nimg),
            Phase("gan", ("disc", "student"), duration_nimg=None)]


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    if batch.x0 is None:
        raise ValueError("method 'ctm' needs images (DSM and the GAN's real samples): the data source has none")
    if group.name == "disc":
        return _disc_loss(ctx, batch, nets, step)
    return _student_loss(ctx, batch, nets, step)


def _student_loss(ctx: RunContext, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """L = L_CTM + lambda_DSM L_DSM (+ lambda_GAN L_GAN in the gan phase) per sample (§7.6)."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    lo, hi = _range(cfg, process)
    x0 = batch.x0.float()
    grid = karras_sigmas(cfg.num_scales, lo, hi, cfg.rho).to(x0.device)
    k, n, m = ctm_levels(step, cfg.num_scales, cfg.num_heun_steps_max)
    t, u, s = grid[n], grid[n + k], grid[m]
    x_t = x0 + append_dims(t, x0.ndim) * step.randn_like(x0)
    x_u = teacher_solve(teacher, grid, x_t, n, k, batch, ctx.config.teacher.guidance)
    eps = torch.full_like(t, lo)
    est, tgt = estimate_and_target(nets.student, nets.get("target"), process, x_t, x_u, t, u, s, eps, batch.cond)
    ctm = distance(est, tgt, cfg.distance, cfg.huber_c)

    sigma = dsm_sigmas(step, cfg, lo, hi)
    dsm = dsm_loss(nets.student, process, x0, sigma, step.randn_like(x0), cfg.sigma_data or process.sigma_data,
                   batch.cond)
    w_dsm = (adaptive_weight(ctm.mean(), dsm.mean(), output_layer(nets.student), clip=cfg.dsm_weight_clip)
             if cfg.dsm_weight is None else torch.tensor(cfg.dsm_weight, device=x0.device))
    loss = ctm + w_dsm * dsm
    terms = {"ctm": ctm.mean().detach(), "dsm": dsm.mean().detach(), "dsm_weight": w_dsm, "heun_steps": float(k)}
    if step.phase == "gan":
        gan = generator_loss(disc_logits(nets.get("disc"), process, est, gan_sigmas(step, cfg, lo, hi),
                                         step.randn_like(est), batch.cond), cfg.gan_loss)
        w_gan = (adaptive_weight(ctm.mean(), gan.mean(), output_layer(nets.student)) if cfg.gan_weight is None
                 else torch.tensor(cfg.gan_weight, device=x0.device))
        loss = loss + w_gan * gan
        terms.update(gan=gan.mean().detach(), gan_weight=w_gan)
    return LossOutput(loss=loss, terms=terms)


def _disc_loss(ctx: RunContext, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Discriminator loss (§7.5): real = training images, fake = the student's data-space estimate
    x_est = G_target(G_theta(x_t, t, s), s, eps) at the CTM training levels, both noised (diffusion GAN)."""
    cfg, process = ctx.method, nets.teacher.process
    lo, hi = _range(cfg, process)
    x0 = batch.x0.float()
    grid = karras_sigmas(cfg.num_scales, lo, hi, cfg.rho).to(x0.device)
    _, n, m = ctm_levels(step, cfg.num_scales, cfg.num_heun_steps_max)
    t, s = grid[n], grid[m]
    with torch.no_grad():
        x_t = x0 + append_dims(t, x0.ndim) * step.randn_like(x0)
        fake = jump(nets.get("target"), process, jump(nets.student, process, x_t, t, s, batch.cond), s,
                    torch.full_like(t, lo), batch.cond)
    disc = nets.get("disc")
    real_logits = disc_logits(disc, process, x0, gan_sigmas(step, cfg, lo, hi), step.randn_like(x0), batch.cond)
    fake_logits = disc_logits(disc, process, fake, gan_sigmas(step, cfg, lo, hi), step.randn_like(x0), batch.cond)
    loss = discriminator_loss(real_logits, fake_logits, cfg.gan_loss)
    return LossOutput(loss=loss, terms={"real_logit": real_logits.mean().detach(),
                                        "fake_logit": fake_logits.mean().detach()})


@hookimpl
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets) -> None:
    if "student" in group.modules:
        ema_update(nets.get("target"), nets.student, ctx.method.target_ema)


# ---------------------------------------------------------------------------------------------
# gamma-sampling


def gamma_sample(G: Jump, noise: Tensor, sigmas: list[float], sigma_min: float, gamma: float,
                 generator: torch.Generator | None = None, clamp: bool = False) -> Tensor:
    """CTM's gamma-sampler (§7.8) on t_0 > ... > t_{N-1} > t_N = sigma_min, from x = t_0 z:

        s = sqrt(1 - gamma^2) (t_{i+1} - eps) + eps;  x <- G(x, t_i, s);
        unless last: x <- x + sqrt(t_{i+1}^2 - s^2) z_i   (fresh noise from ``generator``).

    gamma = 0: deterministic jumps G(x, t_i, t_{i+1}); gamma = 1: the CM multistep sampler (every jump to
    eps, re-noised to t_{i+1}); one step: G(t_0 z, t_0, eps). ``clamp`` bounds every jump that lands at
    eps to [-1, 1]. noise: (B, C, H, W) standard normal. Returns (B, C, H, W)."""
    levels = [*sigmas, sigma_min]
    x = noise * levels[0]
    for i, (t, t_next) in enumerate(zip(levels, levels[1:])):
        s = math.sqrt(1.0 - gamma**2) * (t_next - sigma_min) + sigma_min
        x = G(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype),
              torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype))
        if clamp and s == sigma_min:
            x = x.clamp(-1.0, 1.0)
        scale = (t_next**2 - s**2) ** 0.5 if i < len(sigmas) - 1 else 0.0
        if scale > 0:
            z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
            x = x + scale * z
    return x


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """gamma-sampling with the evaluation EMA when there is one (num_steps network evaluations)."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # g of every jump bounded as the teacher's scheduler bounds x0
    lo, hi = _range(cfg, process)
    sigmas = sampler_sigmas(cfg.sample_sigmas, num_steps, karras_sigmas(cfg.num_scales, lo, hi, cfg.rho))
    net = sampling_net(nets)

    def G(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return jump(net, process, x, t, s, cond)

    return gamma_sample(G, noise.float(), sigmas, lo, cfg.gamma, generator, clamp=cfg.clamp and teacher.vae is None)


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): the jump to sigma_min, f(x, t) = G(x, t, sigma_min), CM's
    consistency function (gamma = 1 in the sampler above)."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()
    lo, hi = _range(cfg, process)
    net = sampling_net(nets)

    def f(x: Tensor, t: Tensor) -> Tensor:
        return jump(net, process, x, t, torch.full_like(t, lo), cond)

    return ConsistencyDenoiser(f, lo, hi, renoise_floor=lo, clamp=cfg.clamp and teacher.vae is None, rho=cfg.rho)


@hookimpl
def fewstep_score_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """The student as a score model (Kim et al. §4: its g at s = t is a denoiser, trained by the DSM term):
    D(x, t) = g(x, t, t), score (D - x) / t^2. Differentiable in x (for the likelihood's divergence)."""
    process, net = nets.teacher.process, sampling_net(nets)

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        return process.denoise(net, x, t, cond, s=s_input(process, t))

    return denoiser
