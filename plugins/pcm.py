"""Phased Consistency Models (Wang et al., NeurIPS 2024, arXiv 2405.18407; consistency.md §10.2).
Method ``pcm``: the probability-flow ODE is split into K phases whose edges are points of the teacher's N-step
solver grid; within each phase the student maps any point to the phase's lower edge, and consistency is asked
between two adjacent solver points of the same phase, one teacher ODE step apart.

Parameterisation (DDIM form, consistency.md §10.2): from (x, sigma) in the phase with lower edge s,
f(x, sigma) = x0_hat + s·(x − x0_hat)/sigma with x0_hat the student's sigma-space denoiser, i.e. one DDIM step
to the edge; f(x, s) = x holds by construction (no c_skip/c_out) and the last phase (s = 0) predicts x0_hat.
Training pair [CODE: G-U-N/Phased-Consistency-Model ``train_pcm_lora_sd15*.py``]: a solver interval
(sigma_i, sigma_{i+1}) drawn uniformly, x_hi = x0 + sigma_i·z, x_lo one teacher DDIM step (CFG scale drawn from
``guidance``, or the teacher's fixed ``teacher.guidance``; 1.0 trains CFG-free, PCM's ``not_apply_cfg_solver``,
which leaves CFG free at inference), online f_θ(x_hi, sigma_i), target sg f_θ⁻(x_lo, sigma_{i+1}), or x_lo itself
when sigma_{i+1} is the edge. θ⁻ is the student under stop-gradient (the official LoRA scripts), or an EMA.

Edges [CODE]: with N solver steps and K phases the official code puts the edges at the solver's ascending
indices floor(linspace(0, N, K, endpoint=False)); here the solver grid is the teacher's own N-step sampling grid
(VP: DDIM trailing, so on a 1000-step DDPM teacher with N = 50, K = 4 the inner edges are timesteps 739, 499, 239,
exactly the official ones; the lowest edge is sigma = 0 where the official one is timestep 0).

Adversarial consistency loss (optional, ``adv_weight``) [CODE]: both the online map and the target map are moved
from the edge to a level sigma' of the same phase by fresh noise, x + sqrt(sigma'² − s²)·z', and a
discriminator on the teacher's features tells the target's (real) from the online's (fake), hinge loss, generator
weight 0.1, discriminator lr 1e-5. fewstep's discriminator is its diffusion discriminator on the teacher's
encoder (``fewstep.gan``), not PCM's multi-head one on the frozen teacher UNet [departure]; sigma' is drawn among
the solver points of the phase (PCM: a uniform DDPM timestep of the phase); the two groups step on the same
steps where PCM alternates them.

Sampler: deterministic DDIM with the student's denoiser through the K + 1 edges (one step per phase), or through
every (K // N)-th edge for N <= K steps (the trained levels; every K/N-th when N divides K); more steps than
phases use the teacher's N-step grid. Exports of flow
teachers (SD3, Flux, Sana) use the family's stock pipeline with FlowMatchEulerDiscreteScheduler at those levels.
Departures and [UNVERIFIED] facts: the official loss is an elementwise pseudo-Huber with c = 0.001 (c's default
[UNVERIFIED]); fewstep's shared distances (``distance``) are offered instead, default pseudo-Huber over the
whole sample (iCT's c). The official guidance range w in [4, 5] is LCM's convention, CFG scale 1 + w.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from fewstep_plugins.pcm_config import PCMConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.diffusion import append_dims, ddim_step, sample_ode
from fewstep.gan import DiffusionDiscriminator, discriminator_loss, generator_loss, probe_cond
from fewstep.hookspecs import hookimpl
from fewstep.losses import distance
from fewstep.nn import ema_update, frozen_copy, same_dropout
from fewstep.sampling import grid_levels, sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), sigma (B,)) -> x0 prediction


# ---------------------------------------------------------------------------------------------
# Pure functions: edges, phases, the phased map


def edge_indices(solver_steps: int, num_phases: int) -> list[int]:
    """Indices of the K + 1 edges in the descending solver grid (index 0 = the noisiest level, N = sigma 0): PCM's
    ascending edge indices floor(linspace(0, N, K, endpoint=False)) mirrored, plus the top level 0."""
    ascending = [math.floor(i * solver_steps / num_phases) for i in range(num_phases)]
    return [0, *sorted(solver_steps - a for a in ascending)]


def phase_of(interval: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """For solver intervals i (from grid[i] down to grid[i + 1]), the grid indices of their phase's lower and
    upper edge: the smallest edge index >= i + 1 and the one before it. interval: (B,) long; edges: (K + 1,)."""
    pos = torch.searchsorted(edges, interval + 1)
    return edges[pos], edges[pos - 1]


def phased_map(x0_hat: Tensor, x: Tensor, sigma: Tensor, edge: Tensor) -> Tensor:
    """f(x, sigma) = x0_hat + edge·(x − x0_hat)/sigma: the DDIM step to the phase's lower edge (PCM's DDIM-form parameterisation)."""
    return ddim_step(x, sigma, edge, x0_hat)


def pair_maps(online: Denoiser, target: Denoiser, x_hi: Tensor, x_lo: Tensor, hi: Tensor, lo: Tensor,
              edge: Tensor) -> tuple[Tensor, Tensor]:
    """(f_θ(x_hi, hi), sg f_θ⁻(x_lo, lo)) onto the common lower edge; where lo is the edge the target is x_lo
    itself (the official c_skip = 1), and the target network is not evaluated at sigma = 0. The target pass runs
    first (as in plugins/cm.py): its intermediates are freed before the online pass keeps its own for the backward;
    the values are the same."""
    with same_dropout(), torch.no_grad():  # the online pass below draws this pass's dropout masks
        on_edge = lo <= edge
        safe = torch.where(on_edge, hi, lo)
        f_target = torch.where(append_dims(on_edge, x_lo.ndim), x_lo,
                               phased_map(target(x_lo, safe), x_lo, safe, edge))
    f_online = phased_map(online(x_hi, hi), x_hi, hi, edge)
    return f_online, f_target


def sample_levels(cfg: PCMConfig, process, num_steps: int) -> list[float]:
    """The N-step sampler's levels: a recipe's list; for N <= K phases, N of the phase edges the student was
    trained to map between (``grid_levels``: every (K // N)-th edge from the top, every K/N-th when N divides K)
    and 0; for N > K, the teacher's own N-step grid."""
    if num_steps in cfg.sample_sigmas:
        return cfg.sample_sigmas[num_steps]
    if num_steps <= cfg.num_phases:
        grid = process.sampling_sigmas(cfg.solver_steps).double()
        edges = grid[edge_indices(cfg.solver_steps, cfg.num_phases)]
        return [*grid_levels(edges[:-1], num_steps), float(edges[-1])]
    return process.sampling_sigmas(num_steps).double().tolist()


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    cfg, nets = ctx.method, {}
    if cfg.target_ema > 0:
        nets["target"] = frozen_copy(student).float()
    if cfg.adv_weight is not None:
        nets["disc"] = DiffusionDiscriminator(teacher.net, teacher.sample_shape, probe_cond(teacher))
    if cfg.guidance is not None and teacher.conditioning == "none" and not teacher.autoguided:
        raise ValueError("method.guidance: a CFG range needs a class- or text-conditional teacher (or "
                         "teacher.autoguidance); this teacher is unconditional. Remove method.guidance.")
    return nets


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup] | None:
    cfg, o = ctx.method, ctx.config.optimizer
    if cfg.adv_weight is None:
        return None  # the core default: one `student` group from the optimizer section
    student = OptimizerGroup.from_recipe(o)
    disc = OptimizerGroup("disc", ("disc",), lr=cfg.disc_lr, every_n_steps=cfg.disc_every_n_steps)
    return [student, disc]


@hookimpl
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase]:
    return [Phase("pcm", tuple(g.name for g in groups), duration_nimg=None)]


def _pair(ctx: RunContext, batch: Batch, nets: Nets, step: StepInfo, grad: bool):
    """The training pair of this step: online and target maps onto the lower edge, the edge and the phase's
    upper edge (sigma, (B,)) and the grid. ``grad``: whether the online map keeps its graph."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    x0 = batch.x0.float()
    grid = process.sampling_sigmas(cfg.solver_steps).to(x0.device, x0.dtype)
    edges = torch.tensor(edge_indices(cfg.solver_steps, cfg.num_phases), device=x0.device)
    i = step.randint(0, cfg.solver_steps).to(x0.device)
    lower, upper = phase_of(i, edges)
    hi, lo, edge = grid[i], grid[i + 1], grid[lower]
    x_hi = x0 + append_dims(hi, x0.ndim) * step.randn_like(x0)
    if cfg.guidance is not None:
        w = step.rand().to(x0.device) * (cfg.guidance[1] - cfg.guidance[0]) + cfg.guidance[0]
    else:
        w = ctx.config.teacher.guidance
    with torch.no_grad():
        x0_teacher = teacher.denoise(x_hi, hi, batch.cond, uncond=batch.uncond, guidance=w).float()
        x_lo = ddim_step(x_hi, hi, lo, x0_teacher)

    def student(x: Tensor, sigma: Tensor) -> Tensor:
        return process.denoise(nets.student, x, sigma, batch.cond)

    target_net = nets.extra.get("target", nets.student)

    def target(x: Tensor, sigma: Tensor) -> Tensor:
        return process.denoise(target_net, x, sigma, batch.cond)

    with torch.set_grad_enabled(grad):
        online, tgt = pair_maps(student, target, x_hi, x_lo, hi, lo, edge)
    return online, tgt, edge, (lower, upper), grid


def _adv_level(step: StepInfo, grid: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """sigma' per sample: a solver point of the phase above its lower edge, uniformly (index upper .. lower − 1)."""
    j = upper + (step.rand().to(grid.device) * (lower - upper)).long()
    return grid[torch.minimum(j, lower - 1)]  # rand < 1, but float32 rounding may reach it


def _disc_logits(disc: nn.Module, process, x: Tensor, edge: Tensor, sigma: Tensor, z: Tensor,
                 cond: Cond | None) -> Tensor:
    """D of x moved from its edge to sigma by fresh noise z: x + sqrt(sigma² − edge²)·z (PCM's noise travel)."""
    travelled = x + append_dims((sigma.square() - edge.square()).clamp_min(0).sqrt(), x.ndim) * z
    x_in, timestep = process.network_inputs(travelled, sigma)
    return disc(x_in, timestep, cond)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """d(f_θ(x_hi), sg f_θ⁻(x_lo)) (+ adv_weight · hinge generator loss), or the discriminator's hinge loss."""
    cfg, process = ctx.method, nets.teacher.process
    if batch.x0 is None:
        raise ValueError("method 'pcm' needs images (x_hi is the noised data): the data source has none")
    is_disc = group.name == "disc"
    online, target, edge, (lower, upper), grid = _pair(ctx, batch, nets, step, grad=not is_disc)
    if is_disc:
        sigma, z = _adv_level(step, grid, lower, upper), step.randn_like(online)
        fake = _disc_logits(nets.get("disc"), process, online, edge, sigma, z, batch.cond)
        real = _disc_logits(nets.get("disc"), process, target, edge, sigma, z, batch.cond)
        return LossOutput(loss=discriminator_loss(real, fake, "hinge"),
                          terms={"real_logit": real.mean().detach(), "fake_logit": fake.mean().detach()})
    loss = distance(online, target, cfg.distance, cfg.huber_c)
    terms = {"consistency": loss.mean().detach(), "edge": edge.mean().detach()}
    if cfg.adv_weight is not None:
        sigma, z = _adv_level(step, grid, lower, upper), step.randn_like(online)
        gan = generator_loss(_disc_logits(nets.get("disc"), process, online, edge, sigma, z, batch.cond), "hinge")
        loss = loss + cfg.adv_weight * gan
        terms["gan"] = gan.mean().detach()
    return LossOutput(loss=loss, terms=terms)


@hookimpl
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets) -> None:
    target = nets.extra.get("target")
    if target is not None and "student" in group.modules:
        ema_update(target, nets.student, ctx.method.target_ema)


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """Flow teachers: DDIM through the levels is Euler in flow time on the student's velocity, diffusers'
    FlowMatchEulerDiscreteScheduler with the levels' times t = sigma/(1 + sigma) as custom sigmas (shift 1; its last
    step, to 0, returns x0 = x_t − t·v). None for VP teachers (DDIMScheduler takes no custom timesteps, TCDScheduler
    ends at timestep 0 rather than at the clean sample) and EDM ones."""
    from fewstep.export import StockSampler

    cfg, process = ctx.method, nets.teacher.process
    if process.kind != "flow":
        return None
    sigmas = torch.tensor(sample_levels(cfg, process, num_steps), dtype=torch.float64)
    t = sigmas / (1 + sigmas)
    config = {"num_train_timesteps": process.num_train_timesteps, "shift": 1.0, "use_dynamic_shifting": False}
    return StockSampler("FlowMatchEulerDiscreteScheduler", config, num_steps, sigmas=tuple(t[:-1].tolist()),
                        latents_scale=float(t[0]), note="deterministic DDIM through the phase edges (Euler in flow time)")


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """Deterministic DDIM through the phase edges with the (EMA) student's denoiser: one step per phase."""
    cfg, teacher = ctx.method, nets.teacher
    process, net = teacher.process.for_sampler(), sampling_net(nets)  # DDIM steps with the bounded x0
    sigmas = torch.tensor(sample_levels(cfg, process, num_steps), dtype=torch.float64)
    out = sample_ode(lambda x, sigma: process.denoise(net, x, sigma, cond), noise.float() * float(sigmas[0]),
                     sigmas, "ddim")
    return out.clamp(-1.0, 1.0) if cfg.clamp and teacher.vae is None else out


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): with one phase the student's x0_hat is its consistency function
    (the phase's lower edge is data); with more phases each map ends at its phase's edge: no editing."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, teacher = ctx.method, nets.teacher
    if cfg.num_phases != 1:
        return None
    process, net = teacher.process.for_sampler(), sampling_net(nets)
    top = float(process.sampling_sigmas(cfg.solver_steps)[0])

    def x0_hat(x: Tensor, sigma: Tensor) -> Tensor:
        return process.denoise(net, x, sigma, cond)

    return ConsistencyDenoiser(x0_hat, process.sigma_min, top, renoise_floor=0.0,
                               clamp=cfg.clamp and teacher.vae is None)
