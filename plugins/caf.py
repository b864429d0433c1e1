"""Constant Acceleration Flow, method ``caf`` (Park et al., NeurIPS 2024; specs/consistency.md §8), and its
baseline ``reflow``, 2-rectified flow fine-tuned from the teacher (Liu et al. 2023; specs/distribution.md
§8.1-8.2). Both train on deterministic noise-image couplings from a pair store (``data.pairs``, made by
``fewstep pairs``): the teacher itself is never called during training.

Convention (CAF §8.1). z = x_0 is the noise, x1 = x_1 = ODE_teacher(z) the teacher's image for it
(``Batch.pairs`` = (z, x1), model space), t in [0, 1] runs from noise (0) to data (1).

Time and output mapping (a fewstep decision; the spec's repo feeds raw t in [0, 1] to a network trained
from scratch, §8.5). Both networks start from the teacher's weights, so they are read through the
teacher's own conventions. The point x at CAF time t is on the straight line x = c·x1 + (1 − c)·z with
c = c_h(t) = h·t + (1 − h)·t² when the initial velocity is exact (the interpolant of §8.2 with
v0 = h(x1 − z)); that is the teacher's sigma-space point x/c at level sigma = (1 − c)/c, so the network
gets the teacher's input scaling and timestep there (``NoiseProcess.denoise``), c clamped to the teacher's
range [1/(1 + sigma_max), 1/(1 + sigma_min)]. Its output is read back as the rectified-flow velocity
u = (D − x)/(1 − c), D the denoiser's x1 estimate. A copy of the teacher is therefore, at step 0, the
teacher's probability-flow velocity in rectified-flow coordinates (for a flow-matching teacher: its own
velocity, negated), and reflow starts exactly as the 1-rectified flow it fine-tunes. For v-prediction,
EDM and flow teachers u is well conditioned at both ends; an epsilon-prediction teacher's u inherits its
noisy x0 estimate near pure noise. h = 1 gives c = t. v_theta is this map of a backbone; a_phi is
a = 2 (u/h - v_hat) of the map u of a backbone with the IVC channels (v_hat concatenated to x, §8.4), an
exact reparameterisation: u/h estimates x1 - z as v_theta's output u ≈ h (x1 - z) does, so a_phi started
from v_theta's weights (§8.4) starts near its target 2 (x1 - z) - 2 v_hat instead of near v_hat (on digits,
3200 images: 1-step coupling PSNR 21.5 dB against 7.4 dB with a_phi = u). The loss on a is §8.4's.

Networks. ``student`` is the network trained in the current phase: v_theta in the velocity stage (phase
``reflow``, v_theta as a rectified flow, h = 1, §8.3; then phase ``velocity`` with h), a_phi afterwards
(phases ``acceleration`` and ``gan``). It is built with the initial-velocity-conditioning channels
(``Backbone.add_input_channels``, zero weights), fed zeros during the velocity stage (as the CAF repo does,
§8.3). At the end of the velocity stage the sampling network (the evaluation EMA when enabled) is copied
into the frozen extra network ``velocity`` and into the student, which trains on as a_phi: a_phi starts
from v_theta's weights (§8.4). Validation grids of the velocity stage use the untrained a_phi, so they
mean nothing. ``velocity`` is a sampling network (``fewstep_sampling_networks``): the export carries it.

Departures: no LPIPS term (its VGG weights are a download; §8.5 LPIPS-Huber becomes pseudo-Huber alone,
with CAF's repo constant c = 0.00054·D and without its 1/D factor, a constant scale); the discriminator is
fewstep's diffusion discriminator on noisy samples (``fewstep.gan``), not StyleGAN-XL's projected one
(§8.6). [R]/[UNVERIFIED] readings are marked where used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from fewstep_plugins.caf_config import (  # noqa: F401 - re-exported from the config module
    CAFConfig,
    ReflowConfig,
    _Flow,
    caf_phases,
    fewstep_configure,
    fewstep_method_config,
)
from torch import Tensor, nn

from fewstep.diffusion import append_dims
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
from fewstep.nn import ema_update, frozen_copy
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

VectorField = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), t (B,)) -> velocity or acceleration (B, C, H, W)
VELOCITY_STAGE = ("reflow", "velocity")


# ---------------------------------------------------------------------------------------------
# Maths (CAF §8.2-8.4, §8.7; rectified flow §8.1)


def path_level(t: Tensor, h: float) -> Tensor:
    """c_h(t) = h t + (1 - h) t²: the share of data in the interpolant with exact v0 = h (x1 - z)."""
    return h * t + (1.0 - h) * t * t


def interpolant(z: Tensor, x1: Tensor, v0: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t²) z + t² x1 + v0 (t - t²) (CAF §8.2): x_0 = z, x_1 = x1. z, x1, v0: (B, C, H, W); t: (B,)."""
    t = append_dims(t, z.ndim)
    return (1 - t * t) * z + t * t * x1 + v0 * (t - t * t)


def velocity_target(z: Tensor, x1: Tensor, h: float) -> Tensor:
    """v0 = h (x1 - z) (CAF §8.3); h = 1: the rectified-flow target x1 - z (distribution.md §8.1)."""
    return h * (x1 - z)


def acceleration_target(z: Tensor, x1: Tensor, v0: Tensor) -> Tensor:
    """a = 2 (x1 - z) - 2 v0 (CAF §8.2/8.4): the constant acceleration that lands on x1 at t = 1."""
    return 2 * (x1 - z) - 2 * v0


def acceleration_from_velocity(u: Tensor, v_hat: Tensor, h: float) -> Tensor:
    """a = 2 (u/h - v_hat): a_phi's output from its velocity map u (module docstring). u/h estimates x1 - z the
    way v_theta's output does, so a_phi started from v_theta's weights starts at its target 2 (x1 - z) - 2 v_hat."""
    return 2 * (u / h - v_hat)


def flow_output(net: nn.Module, process, x: Tensor, t: Tensor, h: float, cond: Cond | None,
                ivc: Tensor | None = None) -> Tensor:
    """The network's rectified-flow velocity at CAF time t (module docstring): u = (D(x/c, (1-c)/c) - x)/(1 - c),
    c = c_h(t) clamped to the teacher's levels. x: (B, C, H, W); t: (B,); ivc: (B, C, H, W) for a_phi."""
    lo, hi = 1.0 / (1.0 + process.sigma_max), 1.0 / (1.0 + process.sigma_min)
    c = path_level(t.float(), h).clamp(lo, hi)
    extra = {} if ivc is None else {"extra_input": ivc}
    d = process.denoise(net, x / append_dims(c, x.ndim), (1 - c) / c, cond, **extra).float()
    return (d - x) / append_dims(1 - c, x.ndim)


def acceleration_output(net: nn.Module, process, x: Tensor, t: Tensor, h: float, cond: Cond | None,
                        v_hat: Tensor) -> Tensor:
    """a_phi(x, t, v_hat): (B, C, H, W), with the IVC input v_hat concatenated to x (CAF §8.4)."""
    return acceleration_from_velocity(flow_output(net, process, x, t, h, cond, ivc=v_hat), v_hat, h)


def caf_sample(velocity: VectorField, acceleration: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor,
               num_steps: int) -> Tensor:
    """CAF's N-step sampler (§8.7), N + 1 evaluations: v = v_theta(z, 0) once, then for i < N with dt = 1/N
    x <- x + dt v + t' dt a_phi(x, i/N, v), t' = (2i + 1)/(2N), the exact increment of x0 + v t + a t²/2."""
    ones = torch.ones(z.shape[0], device=z.device)
    v = velocity(z, torch.zeros_like(ones))
    x, dt = z, 1.0 / num_steps
    for i in range(num_steps):
        x = x + dt * v + (2 * i + 1) / (2 * num_steps) * dt * acceleration(x, i * dt * ones, v)
    return x


def euler_sample(velocity: VectorField, z: Tensor, num_steps: int) -> Tensor:
    """N Euler steps of dx/dt = v(x, t) from t = 0 (noise) to 1 (distribution.md §8.1), N evaluations."""
    ones = torch.ones(z.shape[0], device=z.device)
    x, dt = z, 1.0 / num_steps
    for i in range(num_steps):
        x = x + dt * velocity(x, i * dt * ones)
    return x


# ---------------------------------------------------------------------------------------------
# Schedule: phases as a pure function of the config


_GROUPS = {"reflow": ("velocity",), "velocity": ("velocity",), "acceleration": ("acceleration",),
           "gan": ("generator", "disc")}


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module | None:
    """CAF: a copy of the teacher with the IVC channels (zero weights), one per data channel (§8.4)."""
    if ctx.method.name != "caf":
        return None
    student = copy.deepcopy(teacher.net).float()
    student.add_input_channels(student.in_channels)
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_extra_networks(ctx: RunContext, teacher, student: nn.Module) -> dict[str, nn.Module]:
    """CAF: ``velocity`` (frozen v_theta, filled at the end of the velocity stage) and, with a gan phase,
    ``disc`` (a trainable copy of the teacher's encoder with a head, fewstep.gan)."""
    cfg = ctx.method
    if cfg.name != "caf":
        return {}
    nets: dict[str, nn.Module] = {"velocity": frozen_copy(student).float().eval()}
    if cfg.gan_nimg:
        nets["disc"] = DiffusionDiscriminator(teacher.net, teacher.sample_shape, probe_cond(teacher))
    return nets


@hookimpl
def fewstep_sampling_networks(ctx: RunContext) -> list[str]:
    return ["velocity"] if ctx.method.name == "caf" else []


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup] | None:
    """CAF: velocity and acceleration (the student, ``optimizer`` section; CAF: AdamW 1e-4, wd 1e-5, §8.5),
    and for the gan phase generator (the student at gan_lr, every gan_every steps) and disc (disc_lr)."""
    cfg = ctx.method
    if cfg.name != "caf":
        return None
    o = ctx.config.optimizer
    common = dict(optimizer=o.name, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                  max_grad_norm=o.max_grad_norm)
    groups = [OptimizerGroup.from_recipe(o, "velocity"),
              OptimizerGroup.from_recipe(o, "acceleration", warmup_nimg=0)]
    if cfg.gan_nimg:
        groups += [OptimizerGroup("generator", ("student",), lr=cfg.gan_lr, every_n_steps=cfg.gan_every, **common),
                   OptimizerGroup("disc", ("disc",), lr=cfg.disc_lr, **common)]
    return groups


@hookimpl
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase] | None:
    cfg = ctx.method
    if cfg.name != "caf":
        return None
    spans = caf_phases(cfg, ctx.config.train.total_nimg)
    return [Phase(name, _GROUPS[name], None if i == len(spans) - 1 else n) for i, (name, n) in enumerate(spans)]


@hookimpl
def fewstep_on_phase_end(ctx: RunContext, phase: Phase, nets: Nets) -> None:
    """End of the velocity stage: v_theta (the sampling network: EMA when enabled) becomes the frozen
    ``velocity`` and a_phi's starting point (§8.4)."""
    cfg = ctx.method
    if cfg.name != "caf":
        return
    names = [name for name, _ in caf_phases(cfg, ctx.config.train.total_nimg)]
    if phase.name != [n for n in names if n in VELOCITY_STAGE][-1]:
        return
    final = sampling_net(nets)
    ema_update(nets.extra["velocity"], final, 0.0)
    if final is not nets.student:
        ema_update(nets.student, final, 0.0)


def _caf_times(cfg: CAFConfig, step: StepInfo) -> Tensor:
    """(B,) times uniform on {0, 1/L, ..., 1} (CAF §8.5)."""
    return step.randint(0, cfg.time_levels + 1).float().to(step.device) / cfg.time_levels


def _distance(cfg: _Flow, a: Tensor, b: Tensor) -> Tensor:
    c = cfg.huber_c or 0.00054 * a[0].numel()
    return distance(a, b, cfg.distance, c)


def initial_velocity(velocity: nn.Module, process, z: Tensor, h: float, cond: Cond | None) -> Tensor:
    """v_hat = sg[v_theta(z, t = 0)] (CAF §8.4), (B, C, H, W)."""
    with torch.no_grad():
        return flow_output(velocity, process, z, torch.zeros(z.shape[0], device=z.device), h, cond).detach()


def _one_step(nets: Nets, process, cfg: CAFConfig, z: Tensor, v_hat: Tensor, cond: Cond | None) -> Tensor:
    """x̂1 = z + v_hat + a_phi(z, 0, v_hat)/2, the 1-step output (CAF §8.6's fake sample)."""
    t0 = torch.zeros(z.shape[0], device=z.device)
    return z + v_hat + 0.5 * acceleration_output(nets.student, process, z, t0, cfg.h, cond, v_hat)


def _noisy(disc: nn.Module, process, x: Tensor, sigma: Tensor, noise: Tensor, cond: Cond | None) -> Tensor:
    """Discriminator logits (B,) of x noised to sigma-space level sigma (fewstep.gan's diffusion GAN)."""
    inputs, timestep = process.network_inputs(x + append_dims(sigma, x.ndim) * noise, sigma)
    return disc(inputs, timestep, cond)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """reflow: d(u(x_t, t), x1 - z), x_t = t x1 + (1 - t) z (distribution.md §8.1-8.2). caf, by group:
    velocity d(v_theta(x_t, t), h (x1 - z)) at the interpolant with the true v0 (§8.3; h = 1 in phase
    reflow); acceleration d(a_phi(x_t, t, v_hat), sg[2 (x1 - z) - 2 v_hat]) (§8.4); generator the same plus
    lambda times the adversarial loss of the 1-step sample, lambda adaptive (§8.6); disc its GAN loss."""
    cfg, process = ctx.method, nets.teacher.process
    if batch.pairs is None:
        raise ValueError(f"method {cfg.name!r} needs teacher couplings: set data.pairs to a `fewstep pairs` store")
    z, x1 = (p.float() for p in batch.pairs)
    cond = batch.pair_cond
    if cfg.name == "reflow":
        t = cfg.t_eps + (1 - cfg.t_eps) * step.rand().to(z.device)
        v0 = velocity_target(z, x1, 1.0)
        pred = flow_output(nets.student, process, interpolant(z, x1, v0, t), t, 1.0, cond)
        return LossOutput(loss=_distance(cfg, pred, v0), terms={"t": t.mean().detach()})
    if group.name == "velocity":
        t, h = _caf_times(cfg, step), (1.0 if step.phase == "reflow" else cfg.h)
        v0 = velocity_target(z, x1, h)
        pred = flow_output(nets.student, process, interpolant(z, x1, v0, t), t, h, cond)
        return LossOutput(loss=_distance(cfg, pred, v0), terms={"t": t.mean().detach()})
    v_hat = initial_velocity(nets.extra["velocity"], process, z, cfg.h, cond)
    if group.name == "disc":
        return _disc_loss(cfg, process, batch, nets, step, z, v_hat)
    t = _caf_times(cfg, step)
    target = acceleration_target(z, x1, v_hat)
    pred = acceleration_output(nets.student, process, interpolant(z, x1, v_hat, t), t, cfg.h, cond, v_hat)
    acc = _distance(cfg, pred, target)
    if group.name == "acceleration":
        return LossOutput(loss=acc, terms={"t": t.mean().detach()})
    fake = _one_step(nets, process, cfg, z, v_hat, cond)
    sigma = process.t_to_sigma(step.draw(lambda n, g: process.sample_train_t(n, g))).float().to(z.device)
    gan = generator_loss(_noisy(nets.extra["disc"], process, fake, sigma, step.randn_like(fake), cond), cfg.gan_loss)
    lam = adaptive_weight(acc.mean(), gan.mean(), output_layer(nets.student))
    return LossOutput(loss=acc + lam * gan, terms={"acc": acc.mean().detach(), "gan": gan.mean().detach(),
                                                   "lambda": lam})


def _disc_loss(cfg: CAFConfig, process, batch: Batch, nets: Nets, step: StepInfo, z: Tensor,
               v_hat: Tensor) -> LossOutput:
    """Discriminator on real samples (the data set, or the couplings' x1) vs the 1-step samples, both noised
    to one level per sample from the teacher's training distribution (DMD2-style, distribution.md §2.3(c))."""
    if cfg.gan_real == "data":
        if batch.x0 is None:
            raise ValueError("method caf: gan_real 'data' needs images, but data.source has none; set "
                             "method.gan_real: pairs to use the teacher's images of the couplings")
        real, real_cond = batch.x0.float(), batch.cond
    else:
        real, real_cond = batch.pairs[1].float(), batch.pair_cond
    with torch.no_grad():
        fake = _one_step(nets, process, cfg, z, v_hat, batch.pair_cond)
    sigma = process.t_to_sigma(step.draw(lambda n, g: process.sample_train_t(n, g))).float().to(z.device)
    disc = nets.extra["disc"]
    real_logits = _noisy(disc, process, real, sigma, step.randn_like(real), real_cond)
    fake_logits = _noisy(disc, process, fake, sigma, step.randn_like(fake), batch.pair_cond)
    loss = discriminator_loss(real_logits, fake_logits, cfg.gan_loss)
    return LossOutput(loss=loss, terms={"real": real_logits.mean().detach(), "fake": fake_logits.mean().detach()})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """caf: §8.7's N-step sampler (N + 1 evaluations: v_theta once, a_phi N times); reflow: N Euler steps
    (N evaluations). Both with the EMA when enabled; deterministic (``generator`` is unused)."""
    cfg, process = ctx.method, nets.teacher.process.for_sampler()  # every data estimate D bounded, as the scheduler's
    net = sampling_net(nets)
    z = noise.float()
    if cfg.name == "reflow":
        return euler_sample(lambda x, t: flow_output(net, process, x, t, 1.0, cond), z, num_steps)
    velocity = nets.extra["velocity"]
    return caf_sample(lambda x, t: flow_output(velocity, process, x, t, cfg.h, cond),
                      lambda x, t, v: acceleration_output(net, process, x, t, cfg.h, cond, v), z, num_steps)

