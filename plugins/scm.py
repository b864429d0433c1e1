"""sCM: continuous-time consistency models in TrigFlow, sCT and sCD (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"; specs/consistency.md §6). Method ``scm``
with ``mode: sct`` (consistency training, the velocity is estimated from the data) or ``mode: scd``
(distillation, the velocity is the teacher's PF-ODE, guided when a scale is configured).

TrigFlow from any teacher. A fewstep student is a copy of its teacher, a sigma-space denoiser
D(x, sigma) (``process.denoise``). TrigFlow is the same process seen through sigma = sd·tan t and
x_t = cos t·x (``fewstep.diffusion``, TrigFlow section, §6.1), and sCM's consistency function is the
DDIM step to t = 0, f(x_t, t) = cos t·x_t − sin t·sd·F(x_t, t) = D(x_t / cos t, sd·tan t). So f is
the student's own denoiser and F is defined from it: sd·F = (cos t·x_t − f)/sin t. The tangent is a
JVP of f through the time mapping and ``process.denoise``, whatever the teacher's process (VP, EDM,
flow) and prediction type; at step 0 the student is its teacher.

Where this departs from the paper:
- The paper trains its teacher in TrigFlow with c_noise(t) = t, positional time embeddings and
  adaptive double normalisation (§6.1). A diffusers teacher keeps its own time embedding (e.g. the
  DDPM timestep index, piecewise linear in ln sigma here), so ∂F/∂t goes through that mapping. Its
  growth as t -> π/2 is what the paper avoids with c_noise = t; here the cos t factor of g (and of
  the JVP tangent, the spec's "JVP rearrangement") keeps the product finite, and t is clamped to
  the teacher's level range [arctan(sigma_min/sd), arctan(sigma_max/sd)]: the divisions by sin t
  (F from f) and cos t (x_t -> sigma space) stay bounded there.
- DDPM teachers are fitted at integer timesteps only and their output oscillates between them
  (period about 6 timesteps); the exact ∂_t then follows the oscillation, and on the digits teacher
  exact tangents turned the samples into noise. ``jvp: auto`` (default) therefore takes the tangent
  of a VP teacher as a finite difference along the trajectory over ±12 teacher timesteps (the
  spec's finite-difference alternative, §6.3, with a window instead of a rounding-sized step);
  EDM and flow teachers, trained on continuous time, use the exact JVP.
- The boundary f(x, 0) = x is not structural as in f = cos t·x_t − sin t·sd·F: it comes from the
  teacher's parameterisation (an eps / v / flow output moves x0 by O(sigma), like TrigFlow's O(sin t)),
  so x0-predicting teachers are refused.
- w_phi(t) reads EDM's c_noise = ln(sd·tan t)/4, a monotone function of t, through random Fourier
  features (EDM2-style; the channel count 128 is from EDM2's logvar head, [UNVERIFIED] here).
- Dropout is whatever the teacher's backbone has (the paper uses 0.2 for sCT, 0 for sCD).
"""

from __future__ import annotations

import math

import torch
from fewstep_plugins.scm_config import SCMConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.backbones import guidance_inputs
from fewstep.diffusion import (
    append_dims,
    lognormal_sigmas,
    trigflow_add_noise,
    trigflow_denoise,
    trigflow_sigma_from_t,
    trigflow_t_from_sigma,
    trigflow_velocity,
)
from fewstep.hookspecs import hookimpl
from fewstep.jvp import jvp, normalize_tangent, resolve_mode, window_steps
from fewstep.method_configs import student_guidance
from fewstep.nn import same_dropout, unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

WEIGHT_NET = "adaptive_weight"


# ---------------------------------------------------------------------------------------------
# Pure functions: curriculum, time range, the consistency function, the tangent, the sampler times


def tangent_warmup(nimg: int, warmup_nimg: int) -> float:
    """r = min(1, nimg/H) (Alg. 1 step 4), a pure function of images seen."""
    return 1.0 if warmup_nimg == 0 else min(1.0, nimg / warmup_nimg)


def _sigma_data(cfg: SCMConfig, process) -> float:
    return cfg.sigma_data or process.sigma_data


def time_range(cfg: SCMConfig, process) -> tuple[float, float]:
    """[t_min, t_max] = arctan([sigma_min, min(sigma_max, teacher's)] / sd): the clamp of every t."""
    sd = _sigma_data(cfg, process)
    lo = cfg.sigma_min or process.sigma_min
    hi = min(cfg.sigma_max, process.sigma_max)
    return math.atan(lo / sd), math.atan(hi / sd)


def consistency_fn(net, process, sd: float, x_t: Tensor, t: Tensor, cond: Cond | None, **scalars: Tensor) -> Tensor:
    """f(x_t, t) = D_net(x_t / cos t, sd·tan t) (§6.1 with the EDM equivalence). x_t: (B, C, H, W); t: (B,)."""
    return trigflow_denoise(lambda x, sigma: process.denoise(net, x, sigma, cond, **scalars), x_t, t, sd)


def scm_tangent(net, process, sd: float, x_t: Tensor, t: Tensor, v: Tensor, cond: Cond | None, r: float,
                scalars: dict[str, Tensor], mode: str = "exact", fd_window: float = 12.0) -> tuple[Tensor, Tensor]:
    """(f⁻, g) of Alg. 1 step 5 for the frozen copy ``net`` (same weights, no gradient). v: dx_t/dt (B, C, H, W).

    One JVP of f with tangents (cos t·v, cos t) gives cos t·df⁻/dt directly (the spec's rearrangement,
    with cos t instead of cos t·sin t because f already contains the sin t·sd·F term). With
    df⁻/dt = −cos t (sd F⁻ − v) − sin t (x_t + sd dF⁻/dt), the paper's
    g = −cos²t (sd F⁻ − v) − r cos t sin t (x_t + sd dF⁻/dt) is r·cos t·df⁻/dt − (1 − r) cos²t (sd F⁻ − v).
    mode "finite_difference": per-sample steps that move the teacher's timestep input by ±fd_window.
    """

    def f(x: Tensor, time: Tensor) -> Tensor:
        with same_dropout():  # every evaluation draws the online pass's dropout masks
            return consistency_fn(net, process, sd, x, time, cond, **scalars)

    cos = torch.cos(t)
    step: Tensor | float = 1e-3
    if mode == "finite_difference" and process.kind == "vp":  # EDM / flow teachers: fewstep.jvp's float step
        def model_time(time: Tensor) -> Tensor:
            return process.model_time(process.sigma_to_t(trigflow_sigma_from_t(time, sd)))

        step = window_steps(model_time, t, fd_window, rate=cos, bounds=(0.0, math.pi / 2))
    with torch.no_grad():
        f_minus, cos_df = jvp(f, (x_t, t), (append_dims(cos, x_t.ndim) * v, cos), mode=mode, step=step,
                              dtype=x_t.dtype)
    f_minus, cos_df = f_minus.to(x_t.dtype), cos_df.to(x_t.dtype)
    cos2 = append_dims(cos**2, x_t.ndim)
    g = r * cos_df - (1.0 - r) * cos2 * (trigflow_velocity(x_t, f_minus, t) - v)
    return f_minus, g


def scm_objective(net, process, sd: float, x_t: Tensor, t: Tensor, v: Tensor, cond: Cond | None, r: float,
                  scalars: dict[str, Tensor], cfg: SCMConfig) -> tuple[Tensor, Tensor]:
    """Per-sample ||F_theta − F⁻ − g||²/D (B,) and ||g|| before normalisation (B,) (Alg. 1 steps 5-7 without w_phi).

    ``net`` is the trained student (possibly DDP-wrapped); F⁻ and g come from its unwrapped module (the
    JVP must not run through the wrapper's reducer). F_theta − F⁻ = (f⁻ − f_theta)/(sd sin t): the cos t·x_t
    parts of F cancel exactly."""
    with same_dropout():
        f_theta = consistency_fn(net, process, sd, x_t, t, cond, **scalars)
    f_minus, g = scm_tangent(unwrap(net), process, sd, x_t, t, v, cond, r, scalars, resolve_mode(cfg.jvp, process),
                             cfg.fd_window)
    diff = (f_minus - f_theta) / (sd * append_dims(torch.sin(t), x_t.ndim)) - normalize_tangent(
        g, cfg.tangent_norm, cfg.tangent_c)
    return diff.flatten(1).square().sum(1) / diff[0].numel(), g.flatten(1).norm(dim=1)


def sample_times(cfg: SCMConfig, num_steps: int, t_max: float) -> list[float]:
    """t_1 = t_max, then (N = 2) the paper's 1.1, or N − 1 times evenly spaced from mid_t towards 0."""
    if num_steps in cfg.sample_times:
        return cfg.sample_times[num_steps]
    return [t_max] + [cfg.mid_t * (num_steps - 1 - i) / (num_steps - 1) for i in range(num_steps - 1)]


class AdaptiveWeight(nn.Module):
    """w_phi(t): random Fourier features of c_noise = ln(sd·tan t)/4 -> Linear -> (B,) (§6.2 step 7).

    The features are cos(f·c + phase)·√2 with f ~ N(0, (2π)²), phase ~ U[0, 2π), fixed buffers drawn
    from a private generator; the linear layer starts at zero, so w = 0 and the loss is ||.||²/D at step 0.
    """

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor, sigma_data: float) -> Tensor:
        c_noise = torch.log(sigma_data * torch.tan(t)) / 4
        features = torch.cos(c_noise[:, None] * self.freqs + self.phases) * math.sqrt(2.0)
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Hooks


def _guided(cfg: SCMConfig, ctx: RunContext) -> bool:
    return cfg.mode == "scd" and (cfg.guidance is not None or ctx.config.teacher.guidance != 1.0)


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module | None:
    cfg = ctx.method
    if teacher.process.prediction_type == "sample":
        # f = D: with an x0-predicting network nothing pins f(x, t) -> x as t -> 0 (an eps / v / flow output
        # scales its correction by sigma, like TrigFlow's −sin t·sd·F), and training drifts from the boundary.
        raise ValueError("method 'scm': the teacher predicts x0 (prediction_type 'sample'), so its consistency "
                         "function has no boundary condition at t = 0; use an eps-, v- or flow-prediction teacher")
    if _guided(cfg, ctx) and teacher.conditioning == "none" and not teacher.autoguided:
        raise ValueError("method.guidance / teacher.guidance: guided sCD needs a class- or text-conditional teacher, "
                         "or a weaker checkpoint as teacher.autoguidance; this teacher is unconditional. Remove the "
                         "guidance or set teacher.autoguidance.")
    if cfg.guidance is None:
        return None  # the core default: a copy of the teacher
    import copy

    student = copy.deepcopy(teacher.net).float()
    student.add_scalar_inputs(["w"])
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_extra_networks(ctx: RunContext) -> dict[str, nn.Module]:
    cfg = ctx.method
    return {WEIGHT_NET: AdaptiveWeight(cfg.weight_channels, ctx.seed)} if cfg.adaptive_weight else {}


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    """One group: the student and w_phi share the optimizer (Alg. 1 step 8: a step on (theta, phi))."""
    modules = ("student", WEIGHT_NET) if WEIGHT_NET in nets.extra else ("student",)
    return [OptimizerGroup.from_recipe(ctx.config.optimizer, modules=modules)]


@torch.no_grad()
def teacher_velocity(teacher, batch: Batch, sd: float, x_t: Tensor, t: Tensor, guidance: float | Tensor) -> Tensor:
    """sCD's dx_t/dt = sd·F_pretrain(x_t/sd, t) from the teacher's (guided) denoiser (§6.2)."""
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        return teacher.denoise(x, sigma, batch.cond, uncond=batch.uncond, guidance=guidance).float()

    return trigflow_velocity(x_t, trigflow_denoise(denoise, x_t, t, sd), t)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """(e^{w(t)}/D)·||F_theta − F⁻ − g||² − w(t) (Alg. 1 step 7), per sample."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    if batch.x0 is None:
        raise ValueError("method 'scm' needs images (sCT noises them, sCD evaluates the teacher on them): the data "
                         "source has none")
    sd = _sigma_data(cfg, process)
    t_min, t_max = time_range(cfg, process)
    x0 = batch.x0.float()
    z = step.randn_like(x0) * sd  # z ~ N(0, sd² I)
    sigma = step.draw(lambda n, g: lognormal_sigmas(n, cfg.p_mean, cfg.p_std, g))
    t = trigflow_t_from_sigma(sigma, sd).clamp(t_min, t_max).to(x0.dtype)
    x_t = trigflow_add_noise(x0, z, t)
    w = None
    if cfg.guidance is not None:
        lo, hi = cfg.guidance
        w = step.rand().to(x0.device) * (hi - lo) + lo
    if cfg.mode == "sct":
        v = append_dims(torch.cos(t), x0.ndim) * z - append_dims(torch.sin(t), x0.ndim) * x0
    else:
        v = teacher_velocity(teacher, batch, sd, x_t, t, w if w is not None else ctx.config.teacher.guidance)
    scalars = guidance_inputs(w)
    r = tangent_warmup(step.nimg, cfg.warmup_nimg)
    sq, g_norm = scm_objective(nets.student, process, sd, x_t, t, v, batch.cond, r, scalars, cfg)
    terms = {"t": t.mean().detach(), "r": r, "g_norm": g_norm.mean().detach(), "mse": sq.mean().detach()}
    if WEIGHT_NET not in nets.extra:
        return LossOutput(loss=sq, terms=terms)
    logvar = nets.get(WEIGHT_NET)(t, sd)
    return LossOutput(loss=torch.exp(logvar) * sq - logvar, terms={**terms, "w_phi": logvar.mean().detach()})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """sCM multistep sampling (§6.4): x = sd·z at t_max (times sin t_max, the noise part of x_{t_max}),
    x0 = f(x, t_1); then re-noise x = cos t·x0 + sin t·z, z ~ N(0, sd² I), and map back, for each later t."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # x0 = f bounded as the teacher's scheduler (the export's LCMScheduler)
    sd = _sigma_data(cfg, process)
    times = sample_times(cfg, num_steps, time_range(cfg, process)[1])
    net = sampling_net(nets)
    value = student_guidance(cfg.guidance, cfg.sample_guidance, num_steps)
    scalars = guidance_inputs(None if value is None else torch.full((noise.shape[0],), value, device=noise.device))
    clamp = cfg.clamp and teacher.vae is None
    noise = noise.float()

    def f(x_t: Tensor, time: float) -> Tensor:
        out = consistency_fn(net, process, sd, x_t, torch.full((x_t.shape[0],), time, device=x_t.device), cond,
                             **scalars)
        return out.clamp(-1.0, 1.0) if clamp else out

    x0 = f(math.sin(times[0]) * sd * noise, times[0])
    for time in times[1:]:
        z = torch.randn(noise.shape, generator=generator).to(noise.device) * sd
        x0 = f(math.cos(time) * x0 + math.sin(time) * z, time)
    return x0


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """In sigma space the sCM sampler is "predict x0, re-noise": x = x_t / cos t = x0 + sd·tan t·(z / sd) with
    z / sd unit normal, and f(x_t, t) = D(x, sd·tan t) (§6.1), so the stock ``renoise_sampler`` at levels sd·tan t_i reproduces it (a
    guided student's w folded in). diffusers' SCMScheduler would need a network in TrigFlow's own time
    parameterisation; fewstep's sCM students keep their teacher's."""
    from fewstep.export import renoise_sampler

    cfg, teacher = ctx.method, nets.teacher
    sd = _sigma_data(cfg, teacher.process)
    times = sample_times(cfg, num_steps, time_range(cfg, teacher.process)[1])
    scalars = {}
    if (value := student_guidance(cfg.guidance, cfg.sample_guidance, num_steps)) is not None:
        scalars = {k: float(v[0]) for k, v in guidance_inputs(torch.full((1,), value)).items()}
    return renoise_sampler(teacher.process, [sd * math.tan(t) for t in times], clip=cfg.clamp and teacher.vae is None,
                           scalars=scalars)


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): f in sigma space. A sigma-space x = x0 + sigma eps is the
    TrigFlow x_t / cos t at t = arctan(sigma / sd), so f(x, sigma) = f_trig(cos t x, t); the sampler above
    re-noises from 0 (floor 0)."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()
    sd = _sigma_data(cfg, process)
    t_min, t_max = time_range(cfg, process)
    net = sampling_net(nets)
    w = student_guidance(cfg.guidance, cfg.sample_guidance, 1)  # f jumps to data in one call: the 1-step scale

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        t = torch.atan(sigma / sd)
        scalars = guidance_inputs(None if w is None else torch.full((x.shape[0],), w, device=x.device))
        return consistency_fn(net, process, sd, append_dims(torch.cos(t), x.ndim) * x, t, cond, **scalars)

    return ConsistencyDenoiser(f, sd * math.tan(t_min), sd * math.tan(t_max), renoise_floor=0.0,
                               clamp=cfg.clamp and teacher.vae is None)
