"""Flow maps: Align Your Flow (Sabour, Fidler, Kreis 2025, arXiv 2506.14603; specs/consistency.md §9).
Method ``flowmap``: a (t, s) student trained with the Eulerian (EMD, default) or Lagrangian (LMD)
map distillation objective, optionally from a guided (CFG) or autoguided teacher.

Time convention: rectified-flow time. A sigma-space point (x, sigma) of any teacher is the flow
point x_t = x/(1 + sigma) at t = sigma/(1 + sigma) in [0, 1), so x_t = (1 − t)·x0 + t·eps (the
spec's convention, §9.1) for VP, EDM and flow teachers alike; the teacher's velocity there is
v = (x_t − D(x_t/(1 − t), t/(1 − t)))/t. Flow time is bounded and its velocity is O(1) everywhere,
so the tangent normalisation constant c = 0.1 means the same thing at every noise level (sigma
space would scale both by up to sigma_max). Times are clamped to the teacher's level range
[t_min, t_max] = [sigma_min, sigma_max]/(1 + ·).

The student G(x_t, t, s) is a copy of the teacher with the extra scalar input ``s``
(``Backbone.add_scalar_inputs``, zero-initialised; s is fed in model-time units,
``process.model_time`` of s's level, clamped at the teacher's smallest level so that s = 0 has an
embedding). Its average velocity is read from its denoiser exactly like the teacher's velocity,
F(x_t, t, s) = (x_t − D_G(x_t/(1 − t), t/(1 − t); s))/t, and the Euler parameterisation
f(x_t, t, s) = x_t + (s − t)·F (§9.1) gives f(x, t, t) = x exactly. At step 0, F = v for every s,
so f is one DDIM step of the teacher and the N-step sampler is the teacher's N-step DDIM.

Tangents of DDPM teachers: as in plugins/scm.py, ``jvp: auto`` takes dF⁻/dt of a VP teacher as a
finite difference along the trajectory over ±12 teacher timesteps (the teacher oscillates between its
integer training timesteps; exact tangents gave noise samples on digits), and the exact JVP for EDM
and flow teachers.

[UNVERIFIED] facts used (§9): the (t, s) proposal (§9.4, from unofficial reimplementations), the
guidance range (§9.5), the warm-up length (the paper's is not in the spec; sCM's 10k iterations are
the default here) and the gamma-sampler settings (§9.7).
"""

from __future__ import annotations

import copy

import torch
from fewstep_plugins.flowmap_config import FlowMapConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.backbones import guidance_inputs
from fewstep.diffusion import append_dims
from fewstep.flowmaps import (
    FLOW,
    average_velocity,
    chain,
    default_sample_times,
    fd_steps,
    flow_map,
    s_input,
    teacher_velocity,
    time_range,
)
from fewstep.hookspecs import hookimpl
from fewstep.jvp import jvp, normalize_tangent, resolve_mode
from fewstep.method_configs import student_guidance
from fewstep.nn import same_dropout, unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

# ---------------------------------------------------------------------------------------------
# Pure functions: curriculum, times, the flow map and its tangents


def tangent_warmup(nimg: int, warmup_nimg: int, r_max: float) -> float:
    """r = r_max·min(1, nimg/H) (§9.2 "regularised tangent warm-up"), a pure function of images seen."""
    return r_max if warmup_nimg == 0 else r_max * min(1.0, nimg / warmup_nimg)


def sample_pair(cfg: FlowMapConfig, n: int, generator: torch.Generator) -> Tensor:
    """(n, 2) flow times (t, s) with s <= t, before clamping (§9.4, [UNVERIFIED]); a share
    ``cfg.endpoint_share`` of the pairs then has s = 0 (a fixed number of pairs, not a random one, so that
    every batch trains the maps to the data end equally)."""
    if cfg.time_sampling == "gap":
        d = torch.sigmoid(cfg.p_mean + cfg.p_std * torch.randn(n, generator=generator))
        s = torch.rand(n, generator=generator) * (1 - d)
        ts = torch.stack([s + d, s], dim=1)
    else:
        u = torch.sigmoid(cfg.p_mean + cfg.p_std * torch.randn(n, 2, generator=generator))
        ts = u.sort(dim=1, descending=True).values
    k = round(cfg.endpoint_share * n)
    if k:
        ts[torch.randperm(n, generator=generator)[:k], 1] = 0.0
    return ts


def map_target(objective: str, F_minus: Tensor, g: Tensor, kind: str, c: float) -> Tensor:
    """The stop-gradient regression target of F_theta: F⁻ + ĝ (EMD, §9.2: g is df⁻/dt along the teacher's
    trajectory) or F⁻ − ĝ (LMD, §9.3: g is the residual df⁻/ds − v(f⁻, s)), ĝ the normalised tangent."""
    g_hat = normalize_tangent(g, kind, c)
    return F_minus + g_hat if objective == "emd" else F_minus - g_hat


def emd_tangent(net, process, x: Tensor, t: Tensor, s: Tensor, v: Tensor, cond: Cond | None, r: float,
                scalars: dict[str, Tensor], mode: str = "exact", fd_window: float = 12.0) -> tuple[Tensor, Tensor]:
    """(F⁻, g) of AYF-EMD (§9.2): g = (v − F⁻) + r·(s − t)·dF⁻/dt, dF⁻/dt one JVP with tangent (v, 1, 0).

    With r = 1, g = df⁻/dt along the teacher's trajectory, which vanishes at the exact flow map."""
    def F(x_: Tensor, t_: Tensor) -> Tensor:
        with same_dropout():
            return average_velocity(net, process, x_, t_, s.to(t_.dtype), cond, **scalars)

    def model_time(t_: Tensor) -> Tensor:
        return process.model_time(process.sigma_to_t(FLOW.t_to_sigma(t_)))

    step = fd_steps(mode, process, model_time, t, fd_window)
    with torch.no_grad():
        F_minus, dF = jvp(F, (x, t), (v, torch.ones_like(t)), mode=mode, step=step, dtype=x.dtype)
    F_minus, dF = F_minus.to(x.dtype), dF.to(x.dtype)
    return F_minus, (v - F_minus) + r * append_dims(s - t, x.ndim) * dF


def lmd_tangent(net, process, x: Tensor, t: Tensor, s: Tensor, teacher_velocity, cond: Cond | None, r: float,
                scalars: dict[str, Tensor], mode: str = "exact", fd_window: float = 12.0) -> tuple[Tensor, Tensor]:
    """(F⁻, g) of AYF-LMD (§9.3): g = F⁻ + r·(s − t)·∂_s F⁻ − v_phi(f⁻(x_t, t, s), s), ∂_s F⁻ one JVP with
    tangent (0, 0, 1); df/ds = F + (s − t)·∂_s F. ``teacher_velocity(x, s)`` is v_phi. The warm-up factor r
    on the JVP term mirrors EMD's (our extension; r = 1 is the paper's residual)."""
    def F(s_: Tensor) -> Tensor:
        with same_dropout():
            return average_velocity(net, process, x, t, s_, cond, **scalars)

    step = fd_steps(mode, process, lambda s_: s_input(process, s_), s, fd_window)
    with torch.no_grad():
        F_minus, dF_ds = jvp(F, (s,), (torch.ones_like(s),), mode=mode, step=step, dtype=x.dtype)
        F_minus, dF_ds = F_minus.to(x.dtype), dF_ds.to(x.dtype)
        v_end = teacher_velocity(flow_map(F_minus, x, t, s), s)
    return F_minus, F_minus + r * append_dims(s - t, x.ndim) * dF_ds - v_end


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    cfg = ctx.method
    guided = cfg.guidance is not None or ctx.config.teacher.guidance != 1.0
    if guided and teacher.conditioning == "none" and not teacher.autoguided:
        raise ValueError("method.guidance / teacher.guidance: a guided flow map needs a class- or text-conditional "
                         "teacher (CFG), or a weaker checkpoint as teacher.autoguidance (§9.5); this teacher is "
                         "unconditional. Remove the guidance or set teacher.autoguidance.")
    student = copy.deepcopy(teacher.net).float()
    student.add_scalar_inputs(["s", "w"] if cfg.guidance is not None else ["s"])
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """||F_theta(x_t, t, s) − sg[F⁻ + ĝ]||² (EMD, §9.2) or − ĝ (LMD, §9.3), mean over the sample."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    if batch.x0 is None:
        raise ValueError("method 'flowmap' needs images (x_t is drawn from the noised data): the data source has none")
    x0 = batch.x0.float()
    eps = step.randn_like(x0)
    t_min, t_max = time_range(process)
    ts = step.draw(lambda n, g: sample_pair(cfg, n, g)).clamp(t_min, t_max).to(x0.dtype)
    t, s = ts[:, 0], ts[:, 1]
    x_t = append_dims(1 - t, x0.ndim) * x0 + append_dims(t, x0.ndim) * eps
    w = None
    if cfg.guidance is not None:
        lo, hi = cfg.guidance
        w = step.rand().to(x0.device) * (hi - lo) + lo
    v_teacher = teacher_velocity(teacher, batch, w if w is not None else ctx.config.teacher.guidance)
    scalars = guidance_inputs(w)
    r = tangent_warmup(step.nimg, cfg.warmup_nimg, cfg.r_max)
    with same_dropout():
        F_theta = average_velocity(nets.student, process, x_t, t, s, batch.cond, **scalars)
    # The frozen copy is the unwrapped student: the JVP must not run through the DDP wrapper.
    frozen, mode = unwrap(nets.student), resolve_mode(cfg.jvp, process)
    if cfg.objective == "emd":
        v = v_teacher(x_t, t)
        F_minus, g = emd_tangent(frozen, process, x_t, t, s, v, batch.cond, r, scalars, mode, cfg.fd_window)
    else:
        F_minus, g = lmd_tangent(frozen, process, x_t, t, s, v_teacher, batch.cond, r, scalars, mode, cfg.fd_window)
    target = map_target(cfg.objective, F_minus, g, cfg.tangent_norm, cfg.tangent_c)
    loss = (F_theta - target).flatten(1).square().mean(1)
    terms = {"t": t.mean().detach(), "gap": (t - s).mean().detach(), "r": r,
             "g_norm": g.flatten(1).norm(dim=1).mean().detach()}
    return LossOutput(loss=loss, terms=terms)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """Deterministic chaining on the teacher's N-step grid (or ``sample_times``), optional gamma re-noising."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # each jump's x0 bounded as the teacher's scheduler bounds it
    times = cfg.sample_times.get(num_steps) or default_sample_times(process, num_steps)
    net = sampling_net(nets)
    value = student_guidance(cfg.guidance, cfg.sample_guidance, num_steps)
    scalars = guidance_inputs(None if value is None else torch.full((noise.shape[0],), value, device=noise.device))

    def F_fn(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return average_velocity(net, process, x, t, s, cond, **scalars)

    out = chain(F_fn, noise.float(), times, cfg.gamma, generator)
    return out.clamp(-1.0, 1.0) if cfg.clamp and teacher.vae is None else out


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): the flow map's jump to data, f(x_t, t, 0), in sigma space,
    between the teacher's smallest level and the sampler's first (guided students at their sampling w)."""
    from fewstep.editing import flow_map_denoiser

    cfg, teacher = ctx.method, nets.teacher
    process, net = teacher.process.for_sampler(), sampling_net(nets)
    t_max = default_sample_times(process, 1)[0]
    w = student_guidance(cfg.guidance, cfg.sample_guidance, 1)  # a jump to data: the one-step sampler's scale

    def F_fn(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        scalars = guidance_inputs(None if w is None else torch.full((x.shape[0],), w, device=x.device))
        return average_velocity(net, process, x, t, s, cond, **scalars)

    return flow_map_denoiser(F_fn, process.sigma_min, t_max / (1 - t_max), clamp=cfg.clamp and teacher.vae is None)
