"""Distribution matching: the maths shared by DMD, DMD2 and MSD (specs/distribution.md §1-§3, §0.1).

Three networks take part (§1.1, §2.2): the generator G (the student, a copy of the teacher called at
fixed levels), the frozen teacher, whose guided denoiser is the *real* score mu_real, and the *fake*
score mu_fake, a trainable copy of the teacher that follows the generator's output distribution with
the teacher's own denoising loss (the *critic*, §1.3). DMD2 adds a classifier head on the fake score's
bottleneck (§2.3(c)), so the critic is also the GAN discriminator.

Everything is in sigma space (``fewstep.diffusion``): x = x0 + sigma·eps with sigma = sigma_t/alpha_t,
so one implementation serves VP, EDM and flow teachers. The official code's discrete timesteps become
the *training grid* (:func:`training_sigmas`): the levels of the teacher's 1000 training timesteps (VP,
flow) or of a 1000-point Karras grid (EDM, as the DMD2 EDM code indexes it, §1.2 [C]); "t in
[0.02 T, 0.98 T]" is an index range into it.

The networks reach the functions here as sigma-space callables bound to one batch's conditions
(:data:`Denoiser`, :data:`Critic`), so the same objectives serve one generator (DMD, DMD2) and K
students routed by condition (MSD). Random draws go through :class:`fewstep.types.StepInfo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion import X0Clip, append_dims, karras_sigmas
from fewstep.gan import discriminator_loss, generator_loss, head_logits, probe_cond
from fewstep.method_configs import (  # import-light
    DistributionMatchingConfig,
    FDivergence,
    check_pair_guidance,
)
from fewstep.nn import unwrap
from fewstep.types import Cond, OptimizerGroup, RunContext, StepInfo

__all__ = [
    "Critic",
    "Denoiser",
    "DistributionMatchingConfig",
    "F_DIVERGENCES",
    "FDivergence",
    "Players",
    "Weighting",
    "Schedule",
    "bottleneck_critic",
    "check_pair_guidance",
    "critic_objective",
    "denoiser",
    "denoising_loss",
    "denoising_weight",
    "dm_direction",
    "dm_loss",
    "f_weights",
    "few_step_sample",
    "generate",
    "generator_levels",
    "method_levels",
    "generator_objective",
    "critic_names",
    "levels_per_sample",
    "network_names",
    "optimizer_group",
    "optimizer_groups",
    "probe_cond",
    "routed",
    "simulate",
    "simulation_steps",
    "surrogate_loss",
    "training_sigmas",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), sigma (B,)) -> x0 prediction (B, C, H, W)
Critic = Callable[[Tensor, Tensor], Tensor]  # (noisy x (B, C, H, W), sigma (B,)) -> logits (B,)
Weighting = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, H, W), sigma (B,)) -> per-sample factor on Delta (B,)

EDM_GRID_POINTS = 1000  # the DMD2 EDM code's Karras grid (§1.2 [C])


# ---------------------------------------------------------------------------------------------
# Levels


def training_sigmas(process: Any) -> Tensor:
    """The training grid: ascending sigma-space levels (T,) indexed like the official discrete timesteps.

    VP: the teacher's T timesteps 0..T-1. EDM: a 1000-point Karras grid from sigma_min to sigma_max (the
    DMD2 EDM code's, §1.2 [C]). Flow: T times u = 1/T..1-1/T, shifted as the process (SD3 Eq. 23),
    capped at t_max.
    """
    if process.kind == "vp":
        t = torch.arange(process.num_train_timesteps, dtype=torch.float64)
        return process.t_to_sigma(t).to(torch.get_default_dtype())
    if process.kind == "edm":
        return karras_sigmas(EDM_GRID_POINTS, process.sigma_min, process.sigma_max, process.rho).flip(0)
    n, s = process.num_train_timesteps, process.shift
    u = torch.linspace(1.0 / n, 1.0 - 1.0 / n, n, dtype=torch.float64)
    t = (s * u / (1 + (s - 1) * u)).clamp(max=process.t_max)
    return process.t_to_sigma(t).to(torch.get_default_dtype())


@dataclass(frozen=True)
class Schedule:
    """Where each network is evaluated. grid: the training grid (T,), ascending; levels: the generator's N
    levels, descending; dm: inclusive index range of L_DM's levels; gan: exclusive upper index of the
    diffusion-GAN levels; bound: the teacher scheduler's x0 bound (``process.x0_clip``), which the generator's
    sampler and its backward simulation apply to every x0 they re-noise (:func:`simulate`)."""

    grid: Tensor
    levels: Tensor
    dm: tuple[int, int]
    gan: int
    bound: X0Clip = X0Clip()

    @staticmethod
    def of(cfg: DistributionMatchingConfig, process: Any) -> Schedule:
        grid = training_sigmas(process)
        n = grid.numel()
        lo, hi = cfg.dm_t_range
        return Schedule(grid, method_levels(cfg, grid, cfg.num_steps),
                        (min(round(lo * n), n - 1), min(round(hi * n), n - 1)), max(1, round(cfg.gan_t_max * n)),
                        process.x0_clip)

    def draw(self, step: StepInfo, lo: int, hi: int) -> Tensor:
        """(B,) levels at grid indices drawn uniformly from lo..hi inclusive."""
        return self.grid.to(step.device)[step.randint(lo, hi + 1)]


def generator_levels(grid: Tensor, num_steps: int, sigma_max: float | None = None,
                     levels: Sequence[float] | None = None) -> Tensor:
    """(k,) descending generator levels of a k-step (``num_steps``) sampler or training schedule.

    Default: grid indices top - k*(top+1)/N, top = T-1 (DMD2 §2.7 [C]: 999, 749, 499, 249 for N = 4). With
    ``sigma_max``, top is the last grid level <= sigma_max and the first level is sigma_max itself (DMD2 SDXL's
    one-step generator at timestep 399 is top = 399, §2.6). The k-step levels are a subset of the N-step ones
    when k divides N and N divides top + 1.

    With explicit ``levels`` (the N trained levels, ``method.levels``): each snapped to the nearest grid level in
    log sigma, and a k-step sampler with k <= N takes entries 0, N/k, 2N/k, ... (index j*N//k), a subset of the
    trained levels; k > N steps split the grid evenly below the first level, as the default rule does (levels
    off the trained ones are the generator's extrapolation)."""
    if levels is not None:
        n = len(levels)
        log_grid = grid.double().log()
        wanted = torch.as_tensor(list(levels), dtype=torch.float64).log()
        lo, hi = float(grid[0]), float(grid[-1])
        if bool((wanted < log_grid[0] - 1e-3).any() or (wanted > log_grid[-1] + 1e-3).any()):
            raise ValueError(f"method.levels={list(levels)}: outside the teacher's training grid [{lo:.4g}, "
                             f"{hi:.4g}]; choose sigmas inside it")
        index = (wanted[:, None] - log_grid[None, :]).abs().argmin(1)
        if index.unique().numel() != n:
            raise ValueError(f"method.levels={list(levels)}: two levels snap to the same grid level "
                             f"({grid[index].tolist()}); space them further apart")
        if num_steps > n:
            return generator_levels(grid, num_steps, float(grid[index[0]]))
        return grid[index[[j * n // num_steps for j in range(num_steps)]]].clone()
    n = grid.numel()
    top = n - 1 if sigma_max is None else int(torch.searchsorted(grid, torch.tensor(float(sigma_max)), right=True)) - 1
    if top < num_steps - 1:
        raise ValueError(f"method.sigma_max={sigma_max} leaves {top + 1} training levels at or below it, fewer than "
                         f"the {num_steps} generator steps; raise sigma_max (the grid starts at {grid[0].item():.4g})")
    levels = grid[[top - k * (top + 1) // num_steps for k in range(num_steps)]].clone()
    if sigma_max is not None:
        levels[0] = sigma_max
    return levels


def method_levels(cfg: DistributionMatchingConfig, grid: Tensor, num_steps: int) -> Tensor:
    """(k,) levels of a k-step sampler of this method's generator: :func:`generator_levels` with the config's
    ``sigma_max`` and ``levels``."""
    return generator_levels(grid, num_steps, cfg.sigma_max, cfg.levels)


# ---------------------------------------------------------------------------------------------
# Losses


def dm_direction(x: Tensor, mu_real: Tensor, mu_fake: Tensor) -> Tensor:
    """The distribution-matching step Delta = (mu_fake − mu_real) / mean_chw |x − mu_real| per sample
    (§1.2, implementation form [C]), nan_to_num'd. x, mu_real, mu_fake: (B, C, H, W) -> (B, C, H, W).

    With scores s = (mu − x_t)/sigma² this is sigma²·(s_fake − s_real) / mean|x − mu_real|: the paper's
    weight w_t = sigma²·CS/||mu_real − x||_1 times the score difference, without its extra alpha_t."""
    norm = (x - mu_real).abs().flatten(1).mean(1)
    return torch.nan_to_num((mu_fake - mu_real) / append_dims(norm, x.ndim))


def surrogate_loss(x: Tensor, direction: Tensor) -> Tensor:
    """Per-sample ½ mean_chw (x − sg(x − Delta))² (§0.1): the batch mean has gradient Delta/(B·C·H·W) in x."""
    x = x.float()
    return 0.5 * (x - (x - direction).detach()).square().flatten(1).mean(1)


def dm_loss(x: Tensor, real: Denoiser, fake: Denoiser, sigma: Tensor, eps: Tensor,
            weight: Weighting | None = None) -> tuple[Tensor, Tensor]:
    """L_DM of generator samples x (B, C, H, W) noised to x + sigma·eps (sigma (B,)): per-sample losses (B,)
    and Delta. Both denoisers run without gradient (§1.2); only x carries one. ``weight``: a per-sample
    factor on Delta read at the same noisy point (f-distill's h(r), :func:`f_weights`), also without gradient."""
    with torch.no_grad():
        xd = x.detach().float()
        x_t = xd + append_dims(sigma, x.ndim) * eps
        delta = dm_direction(xd, real(x_t, sigma).float(), fake(x_t, sigma).float())
        if weight is not None:
            delta = delta * append_dims(weight(x_t, sigma).float(), x.ndim)
    return surrogate_loss(x, delta), delta


def denoising_weight(process: Any, sigma: Tensor) -> Tensor:
    """(B,) weight that turns an x0 squared error at level sigma into the teacher's pretraining loss.

    The raw output is affine in x0 at fixed x_t (eps, v, sample, EDM F, flow velocity), with a per-sample
    slope a(t); the pretraining loss is loss_weight(t)·|out − out*|², i.e. loss_weight(t)·a(t)²·|x0 − x0*|².
    EDM: 1/c_out² = 1/sigma² + 1/sigma_d² (§1.3); VP eps: 1/sigma² (the eps-MSE of §1.3 for SD)."""
    t = process.sigma_to_t(sigma.double())
    zero, one = torch.zeros_like(t)[:, None], torch.ones_like(t)[:, None]
    slope = (process.output_from_x0(one, zero, t) - process.output_from_x0(zero, zero, t)).squeeze(1)
    return (process.loss_weight(t) * slope.square()).to(sigma.dtype)


def denoising_loss(process: Any, net: Denoiser, x: Tensor, sigma: Tensor, target: Tensor) -> Tensor:
    """Teacher-weighted denoising loss (B,) of ``net`` at x (B, C, H, W), level sigma (B,), towards the x0
    ``target``: the fake score's loss on generator samples (§1.3) and MSD's teacher score matching (§3.3)."""
    err = (net(x, sigma).float() - target.float()).square().flatten(1).mean(1)
    return denoising_weight(process, sigma) * err


# ---------------------------------------------------------------------------------------------
# The generator: backward simulation and sampling (DMD2 §2.7)


def simulate(generator: Denoiser, noise: Tensor, levels: Tensor, k: int | Tensor, step: StepInfo,
             bound: X0Clip = X0Clip()) -> tuple[Tensor, Tensor]:
    """Backward simulation: the generator's training input at level k. noise: (B, C, H, W).

    Without gradient, start from pure noise at levels[0] and run k steps of the sampler (x0 = G(x, s_j),
    then x = x0 + s_{j+1}·eps_j with fresh eps_j); k = 0 is the noise itself (§2.7 [C]). Returns the input
    (B, C, H, W) and its level (B,). ``k`` a (B,) CPU tensor (:func:`levels_per_sample`): each sample's own
    level; the generator runs max(k) steps on the whole batch (it is bound to the batch's conditions) and a
    row keeps its value once its k steps are done; every step draws eps for the whole batch, so row i is row i
    of the one-level simulation at k_i.

    ``bound``: the teacher scheduler's x0 bound (``process.x0_clip``). The sampler applies it to every x0 before
    re-noising (``NoiseProcess.for_sampler``, the export's LCMScheduler), so the simulation does too: backward
    simulation exists to train the generator on the inputs its sampler gives it (§2.7), and an unbounded x0
    there (157x the network's error at DDPM's top level) would be an input the sampler never produces. The
    generator's output at level k, which the losses read, stays unbounded: a clamp would zero its gradient in
    every clipped pixel, and the sampler bounds it anyway."""
    x = noise * levels[0]
    ks = k.to(x.device) if isinstance(k, Tensor) else torch.full((x.shape[0],), k, device=x.device)
    with torch.no_grad():
        for j in range(int(k.max()) if isinstance(k, Tensor) else k):
            x0 = bound(generator(x, levels[j].expand(x.shape[0]).to(x.device)).float())
            x = torch.where(append_dims(ks > j, x.ndim), x0 + levels[j + 1] * step.randn_like(x0), x)
    return x, levels.to(x.device)[ks]


def few_step_sample(generator: Denoiser, noise: Tensor, levels: Tensor, rng: torch.Generator | None) -> Tensor:
    """DMD2's multistep sampler (§2.7): x0 = G(x, s_j), re-noised to s_{j+1} with fresh noise, until the
    last level; one step is G(s_0·z, s_0). noise: (B, C, H, W) standard normal -> x0 samples."""
    levels = levels.to(noise.device)
    x = noise.float() * levels[0]
    for j in range(levels.numel()):
        x0 = generator(x, levels[j].expand(x.shape[0])).float()
        if j + 1 < levels.numel():
            z = torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(x0.device)
            x = x0 + levels[j + 1] * z
    return x0


def simulation_steps(step: StepInfo, num_steps: int) -> int:
    """k ~ U{0..N-1}, one per step: drawn from the step's generator, which every rank and micro-batch seeds
    alike, so k is shared as DMD2's broadcast from rank 0 (§2.7 [C]). No host-device sync (a CPU draw)."""
    return int(torch.randint(0, num_steps, (), generator=step.generator)) if num_steps > 1 else 0


def levels_per_sample(step: StepInfo, num_steps: int) -> Tensor:
    """(B_local,) CPU int64 levels 0..N-1, one per sample: global row j gets level (j + s) mod N, with s ~
    U{0..N-1} drawn from the step's generator (shared by every rank). Every N consecutive rows hold every level
    once, so each level gets B/N samples of the global batch (one more for B mod N of them) and every
    micro-batch of at least N samples holds every level: each level's networks then run on every rank, as DDP
    needs. The assignment depends on the global row only (exact replay, multi-process equality); the rows of a
    level are a random share of the batch because the data order is. DMD2's per-level critics
    (``fake_score_per_level``) train every level's fake score on its share each turn."""
    if step.local_batch < num_steps:  # the methods refuse such a batch when they build their networks
        raise ValueError(f"levels_per_sample: a micro-batch of {step.local_batch} samples cannot hold each of "
                         f"{num_steps} levels; it needs at least num_steps samples per micro-batch")
    shift = int(torch.randint(0, num_steps, (), generator=step.generator))
    return (torch.arange(step.offset, step.offset + step.local_batch) + shift) % num_steps


def routed(parts: Sequence[tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]]) -> Callable[[Tensor, Tensor], Tensor]:
    """One (x, sigma) -> (B, ...) callable over the batch whose rows go to their own networks: ``parts`` =
    [(rows, fn)], the rows (n_k,) of the parts partitioning 0..B-1 (empty parts are skipped). The outputs come
    back in the batch's order, differentiably (a concatenation and one gather)."""
    parts = [(rows, fn) for rows, fn in parts if rows.numel()]
    order = torch.cat([rows for rows, _ in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)

    def call(x: Tensor, sigma: Tensor) -> Tensor:
        return torch.cat([fn(x[rows], sigma[rows]) for rows, fn in parts])[inverse]

    return call


def generate(cfg: DistributionMatchingConfig, sched: Schedule, generator: Denoiser, shape: tuple[int, ...],
             step: StepInfo, x_real: Tensor | None = None,
             k: int | Tensor | None = None) -> tuple[Tensor, int | Tensor]:
    """Generator samples (B, *shape) for one turn, and the simulated step k: one-step G(s_0·z), or for
    N > 1 the output at level k of a backward simulation (or of noised real images, without it). ``k``:
    the level, drawn by the caller (who picks networks by it), or a (B,) CPU tensor of per-sample levels
    (:func:`levels_per_sample`); None: one level drawn here."""
    z = step.randn(*shape)
    if k is None:
        k = simulation_steps(step, sched.levels.numel())
    per_sample = isinstance(k, Tensor)
    if cfg.backward_simulation or (not per_sample and k == 0):
        x_in, sigma = simulate(generator, z, sched.levels, k, step, sched.bound)
    else:
        if x_real is None:
            raise ValueError("method.backward_simulation: false trains on noised real images; the data "
                             "source has none (set backward_simulation: true)")
        levels = sched.levels.to(z.device)
        sigma = levels[k.to(z.device)] if per_sample else levels[k].expand(z.shape[0])
        x_in = x_real.float() + append_dims(sigma, z.ndim) * z
        if per_sample:  # level 0 is pure noise, as the one-level path's simulate(k = 0)
            x_in = torch.where(append_dims(k.to(z.device) == 0, z.ndim), z * levels[0], x_in)
    return generator(x_in, sigma), k


# ---------------------------------------------------------------------------------------------
# Objectives (one turn each; §2.3-2.4)


@dataclass(frozen=True)
class Players:
    """The networks of one turn, bound to the batch's conditions.

    generator: the student(s); real: the guided teacher; fake: the fake score(s), unguided; critic: head on
    the fake score's bottleneck (None without a GAN)."""

    generator: Denoiser
    real: Denoiser
    fake: Denoiser
    critic: Critic | None = None


def _noised_logits(critic: Critic, sched: Schedule, x: Tensor, step: StepInfo) -> Tensor:
    """Diffusion-GAN: the critic's logits (B,) of x noised at a level from the lowest gan_t_max of the grid."""
    sigma = sched.draw(step, 0, sched.gan - 1)
    return critic(x.float() + append_dims(sigma, x.ndim) * step.randn_like(x.float()), sigma)


def generator_objective(cfg: DistributionMatchingConfig, sched: Schedule, p: Players, shape: tuple[int, ...],
                        step: StepInfo, *, x_real: Tensor | None = None, gan_weight: float = 0.0,
                        weight: Weighting | None = None, k: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """L_DM + lambda_G·softplus(−D(G(z))) per sample (B,) (§2.3(a), (d)). The critic's networks arrive
    frozen, and the adversarial gradient flows through them into G's output (§2.3(d) [C]). ``weight``: see
    :func:`dm_loss` (None: DMD's unweighted step); ``k``: see :func:`generate`."""
    x, k = generate(cfg, sched, p.generator, shape, step, x_real, k)
    sigma = sched.draw(step, *sched.dm)
    loss, delta = dm_loss(x, p.real, p.fake, sigma, step.randn_like(x.float()), weight)
    terms = {"dm": loss.detach().mean(), "dm_delta": delta.abs().mean(), "sim_step": float(k)}
    if gan_weight > 0:
        adv = generator_loss(_noised_logits(p.critic, sched, x, step).float())
        loss = loss + gan_weight * adv
        terms["gan"] = adv.detach().mean()
    return loss, terms


def critic_objective(cfg: DistributionMatchingConfig, sched: Schedule, p: Players, process: Any,
                     shape: tuple[int, ...], step: StepInfo, *, x_real: Tensor | None = None,
                     k: int | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """L_denoise of the fake score on detached generator samples at a level uniform over the whole grid
    (§1.3 [C]), plus lambda_D times the discriminator loss on real images x_real and those samples, each
    noised independently (§2.3(b)-(d)). Per sample (B,). ``k``: see :func:`generate`."""
    with torch.no_grad():
        x = generate(cfg, sched, p.generator, shape, step, x_real, k)[0].float()
    sigma = sched.draw(step, 0, sched.grid.numel() - 1)
    x_t = x + append_dims(sigma, x.ndim) * step.randn_like(x)
    loss = denoising_loss(process, p.fake, x_t, sigma, x)
    terms = {"denoise": loss.detach().mean()}
    if cfg.adversarial:
        if x_real is None:
            raise ValueError("method.gan_critic_weight > 0: the discriminator needs real images, but the data "
                             "source has none; use an image data source or set both GAN weights to 0")
        real_logits = _noised_logits(p.critic, sched, x_real, step).float()
        fake_logits = _noised_logits(p.critic, sched, x, step).float()
        disc = discriminator_loss(real_logits, fake_logits)
        loss = loss + cfg.gan_critic_weight * disc
        terms.update(disc=disc.detach().mean(), d_real=real_logits.detach().mean(), d_fake=fake_logits.detach().mean())
    return loss, terms


# ---------------------------------------------------------------------------------------------
# f-divergence weighting (f-distill: Xu, Nie, Vahdat 2025, arXiv:2502.15681)
#
# For D_f(p||q) = E_q f(p/q) between the teacher's (data's) noisy marginal p and the generator's q, the
# generator's gradient is the reverse-KL (DMD) one with the score difference weighted per sample by
# h(r) = f''(r)·r², r = p/q at the noisy point. f and h below: h derived here from f (checked by autograd in
# tests/test_fdistill.py); the list and the f of each divergence follow NVIDIA FastGen's f-distill (its h
# agree with these up to constant factors, which the batch normalisation removes); the paper's own table was
# not read [UNVERIFIED against the paper]. The softened reverse KL's f is this module's derivation from
# FastGen's h = 1/(1 + r) [UNVERIFIED].


F_DIVERGENCES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    # name: (f(r), h(r) = f''(r) r²)
    "reverse_kl": (lambda r: -torch.log(r), lambda r: torch.ones_like(r)),
    "forward_kl": (lambda r: r * torch.log(r), lambda r: r),
    "js": (lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2), lambda r: r / (1 + r)),
    "squared_hellinger": (lambda r: (torch.sqrt(r) - 1) ** 2, lambda r: 0.5 * torch.sqrt(r)),
    "jeffreys": (lambda r: (r - 1) * torch.log(r), lambda r: 1 + r),
    "softened_rkl": (lambda r: (1 + r) * torch.log((1 + r) / (2 * r)), lambda r: 1 / (1 + r)),
    "neyman_chi2": (lambda r: (1 - r) ** 2 / r, lambda r: 2 / r),
}


def f_weights(divergence: FDivergence, logits: Tensor, *, ratio_clip: tuple[float, float] = (0.1, 20.0),
              bins: Tensor | None = None, num_bins: int = 0, logit_clip: float = 10.0) -> Tensor:
    """Per-sample weights (B,) of the DM step for an f-divergence, mean 1 over the batch.

    logits: (B,) the discriminator's estimate of log r = log p/q at the noisy points (the optimum of the
    non-saturating GAN loss, §2.3(c)), clamped to ±logit_clip; r is clipped to ``ratio_clip``. With
    ``bins`` ((B,) ints in [0, num_bins), the sample's noise-level bin) r is first divided by its bin's batch
    mean; then h(r) is divided by its batch mean. The clip [0.1, 20], the ±10 logits and the ``fdistill``
    plugin's 10 level bins are FastGen's f-distill defaults [C, FastGen]; FastGen keeps an EMA of the bin
    means (rate 0 by default, 0.5 on ImageNet-64) and normalises over the global batch, where this uses the
    batch the loss hook sees [departure]."""
    r = torch.exp(logits.detach().float().clamp(-logit_clip, logit_clip)).clamp(*ratio_clip)
    if bins is not None:
        count = torch.bincount(bins, minlength=num_bins).float()
        total = torch.bincount(bins, weights=r, minlength=num_bins)
        r = r / (total / count.clamp(min=1.0))[bins]
    h = F_DIVERGENCES[divergence][1](r)
    return h / h.mean().clamp(min=math.ulp(1.0))


# ---------------------------------------------------------------------------------------------
# Binding networks, and the groups


def network_names(prefix: str, k: int) -> list[str]:
    """Names of K networks of one role (MSD's students, per-student or per-level fake scores and heads):
    the first has the bare name, so a run with one keeps the usual name."""
    return [prefix] + [f"{prefix}_{i}" for i in range(1, k)]


def critic_names(k: int) -> list[tuple[str, str]]:
    """(fake score, GAN head) names of K critics (DMD2's per-level, MSD's per-student ones)."""
    return list(zip(network_names("fake_score", k), network_names("gan_head", k)))


def denoiser(process: Any, net: nn.Module, cond: Cond | None) -> Denoiser:
    """``net``'s sigma-space denoiser for the batch's conditions."""
    return lambda x, sigma: process.denoise(net, x, sigma, cond)


def bottleneck_critic(process: Any, backbone: nn.Module, head: nn.Module, cond: Cond | None) -> Critic:
    """D(x, c) = head(bottleneck of ``backbone`` fed as the teacher would be at (x, sigma)) (§2.3(c)); with
    :class:`fewstep.gan.LevelHeads` (``gan_heads: levels``) one logit per feature level, (B, L); patch heads
    (``gan_head_grid`` g > 1) g² logits per head.

    ``Backbone.bottleneck`` / ``features`` is reached through ``unwrap``: under DDP the critic's wrapped forward
    also runs in the same turn (its denoising loss), and one backward then reduces the summed gradient."""
    def critic(x: Tensor, sigma: Tensor) -> Tensor:
        inputs, timestep = process.network_inputs(x, sigma)
        return head_logits(head, unwrap(backbone), inputs, timestep, cond)

    return critic


def optimizer_group(ctx: RunContext, name: str, modules: tuple[str, ...], *, lr: float | None = None,
                    every_n_steps: int = 1) -> OptimizerGroup:
    """A group with the recipe's optimizer settings (rate ``lr`` when given)."""
    o = ctx.config.optimizer
    return OptimizerGroup.from_recipe(o, name, modules, lr=lr or o.lr, every_n_steps=every_n_steps)


def optimizer_groups(ctx: RunContext, generator: tuple[str, ...], critic: tuple[str, ...]) -> list[OptimizerGroup]:
    """The generator group, stepped every ``ratio`` trainer steps, then the critic group, every step (TTUR,
    §2.4: the generator turn comes first in an iteration); the critic's rate is ``critic_lr`` when given."""
    cfg = ctx.method
    return [optimizer_group(ctx, "generator", generator, every_n_steps=cfg.ratio),
            optimizer_group(ctx, "critic", critic, lr=cfg.critic_lr)]
