"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).
Method ``meanflow``: an average-velocity network u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ trained with the
MeanFlow identity

    u(z_t, r, t) = v(z_t, t) − (t − r)·d/dt u(z_t, r, t),   d/dt u = v·∂_z u + ∂_t u   (the MeanFlow identity),

as the regression ||u_θ(z_t, r, t) − sg(u_tgt)||² with u_tgt the right-hand side at θ, the total derivative one
JVP with tangent (v, 0, 1) over (z, r, t) (``fewstep.jvp``: exact forward mode, or a central finite difference),
and the adaptive weight w = 1/(||Δ||² + c)^p (stop-gradient). v is the flow-matching velocity eps − x0 of the
data (``velocity: data``, the paper's training from scratch) or the teacher's velocity, guided when the recipe
guides the teacher (``velocity: teacher``, distillation). Sampling: z_0 = z_1 − u(z_1, 0, 1), or chained
z_r = z_t − (t − r)·u(z_t, r, t) over a grid; the 1-step sampler exports to the teacher family's stock pipeline
(an x0 prediction at the first level, r folded into the student).

Time and network: rectified-flow time read from any teacher (``fewstep.flowmaps``: t = sigma/(1 + sigma),
z_t = (1 − t)·x0 + t·eps); u is the (t, s) student's average velocity with s = r, the teacher backbone with the
zero-initialised scalar input ``s`` (as ``flowmap``): at step 0 u(z, r, t) = v(z, t) for every r, so the student
starts as the teacher's flow velocity and its 1-step sample is the teacher's 1-step DDIM. The paper conditions
on (t, t − r) and reports that other forms, (t, r) among them, also work [UNVERIFIED: ablation read in a summary].
This is AYF-EMD (consistency.md §9.2) with r = 1 and no tangent normalisation, plus MeanFlow's own time proposal,
r = t fraction and adaptive weight.

Defaults are the official PyTorch code's CIFAR-10 settings [CODE: Meta's py-meanflow ``train_arg_parser.py``, read
in the fork revsic/py-meanflow]: ratio of r != t 0.75, t ~ logit-normal(−0.6, 1.6), r ~ logit-normal(−4.0, 1.6)
then sorted, p = 0.75, c = 1e-3. The paper's ImageNet settings (ratio 0.25, logit-normal(−0.4, 1.0) for both,
p = 1.0) are [UNVERIFIED: from memory]. MeanFlow's in-training CFG (mixing the network's own unconditional
velocity into v) is not implemented: guide the teacher instead (``teacher.guidance``, distillation only).
"""

from __future__ import annotations

import copy

import torch
from fewstep_plugins.meanflow_config import MeanFlowConfig, fewstep_configure, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.diffusion import append_dims
from fewstep.flowmaps import (
    FLOW,
    average_velocity,
    chain,
    default_sample_times,
    fd_steps,
    s_input,
    teacher_velocity,
    time_range,
)
from fewstep.hookspecs import hookimpl
from fewstep.jvp import jvp, normalize_tangent, resolve_mode
from fewstep.nn import same_dropout, unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

# ---------------------------------------------------------------------------------------------
# Pure functions: times, the total derivative, the target, the weight


def sample_times(cfg: MeanFlowConfig, n: int, generator: torch.Generator) -> Tensor:
    """(n, 2) flow times (t, r), r <= t: t and r logit-normal, sorted, then r = t for a fraction 1 − ratio."""
    t = torch.sigmoid(cfg.p_mean_t + cfg.p_std_t * torch.randn(n, generator=generator))
    r = torch.sigmoid(cfg.p_mean_r + cfg.p_std_r * torch.randn(n, generator=generator))
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    distinct = torch.rand(n, generator=generator) < cfg.ratio
    return torch.stack([t, torch.where(distinct, r, t)], dim=1)


def total_derivative(net, process, x: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Cond | None,
                     scalars: dict[str, Tensor], mode: str = "exact", fd_window: float = 12.0) -> tuple[Tensor, Tensor]:
    """(u, du/dt): u(z_t, r, t) and its total derivative along the trajectory, v·∂_z u + ∂_t u, one JVP with
    tangent (v, 0, 1) over (z, r, t) (r is held fixed). x, v: (B, C, H, W); t, r: (B,). Call under no_grad."""
    def u(x_: Tensor, t_: Tensor) -> Tensor:
        with same_dropout():
            return average_velocity(net, process, x_, t_, r.to(t_.dtype), cond, **scalars)

    def model_time(t_: Tensor) -> Tensor:
        return process.model_time(process.sigma_to_t(FLOW.t_to_sigma(t_)))

    step = fd_steps(mode, process, model_time, t, fd_window)
    u_val, du_dt = jvp(u, (x, t), (v, torch.ones_like(t)), mode=mode, step=step, dtype=x.dtype)
    return u_val.to(x.dtype), du_dt.to(x.dtype)


def meanflow_target(v: Tensor, du_dt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """u_tgt = v − (t − r)·du/dt (the MeanFlow target). v, du_dt: (B, C, H, W); t, r: (B,)."""
    return v - append_dims(t - r, v.ndim) * du_dt


def adaptive_weight(squared_error: Tensor, p: float, c: float) -> Tensor:
    """sg(1/(||Δ||² + c)^p) per sample (MeanFlow's adaptive loss weighting): p = 1 turns the squared L2 into a log-like loss, p = 0.5
    into pseudo-Huber-like. squared_error: (B,)."""
    return (squared_error.detach() + c).pow(-p)


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    """The teacher's backbone (its weights, or fresh ones for ``init: random``) with the scalar input ``s`` = r."""
    if ctx.method.init == "random":
        from fewstep.backbones import Backbone

        student = Backbone.from_config_dict(teacher.net.config_dict())
    else:
        student = copy.deepcopy(teacher.net)
    student = student.float()
    student.add_scalar_inputs(["s"])
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """w·||u_θ(z_t, r, t) − sg(u_tgt)||² per sample, summed over the sample (the official code's form)."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    if batch.x0 is None:
        raise ValueError("method 'meanflow' needs images (z_t is drawn from the noised data): the data source has none")
    x0 = batch.x0.float()
    eps = step.randn_like(x0)
    t_min, t_max = time_range(process)
    tr = step.draw(lambda n, g: sample_times(cfg, n, g)).to(x0.device, x0.dtype)
    t = tr[:, 0].clamp(t_min, t_max)
    r = torch.where(tr[:, 1] == tr[:, 0], t, torch.minimum(tr[:, 1], t))  # r = t pairs stay equal after the clamp
    x_t = append_dims(1 - t, x0.ndim) * x0 + append_dims(t, x0.ndim) * eps
    with torch.no_grad():
        if cfg.velocity == "data":
            v = eps - x0
        else:
            v = teacher_velocity(teacher, batch, ctx.config.teacher.guidance)(x_t, t)
    with same_dropout():
        u_theta = average_velocity(nets.student, process, x_t, t, r, batch.cond)
    # The JVP runs through the unwrapped student: a forward-mode pass must not go through the DDP wrapper.
    with torch.no_grad():
        u_minus, du_dt = total_derivative(unwrap(nets.student), process, x_t, t, r, v, batch.cond, {},
                                          resolve_mode(cfg.jvp, process), cfg.fd_window)
        target = u_minus + normalize_tangent(meanflow_target(v, du_dt, t, r) - u_minus, cfg.tangent_norm, cfg.tangent_c)
    squared = (u_theta - target).flatten(1).square().sum(1)
    weight = adaptive_weight(squared, cfg.adaptive_p, cfg.adaptive_c)
    terms = {"t": t.mean().detach(), "gap": (t - r).mean().detach(), "squared_error": squared.mean().detach(),
             "r_equals_t": (r == t).float().mean()}
    return LossOutput(loss=weight * squared, terms=terms)


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """The 1-step sampler z_0 = z_t − t·u(z_t, 0, t) is the student's x0 prediction at the first level (u is read as
    (z_t − x0)/t), with the r input fixed: the stock ``renoise_sampler`` at one level, r folded into the student.
    None for more steps, where r changes from step to step."""
    from fewstep.export import renoise_sampler

    cfg, teacher = ctx.method, nets.teacher
    times = cfg.sample_times.get(num_steps) or default_sample_times(teacher.process, num_steps)
    if num_steps != 1 or times[-1] != 0.0:
        return None
    s = s_input(teacher.process, torch.zeros(1, dtype=torch.float64))
    return renoise_sampler(teacher.process, [times[0] / (1 - times[0])], clip=cfg.clamp and teacher.vae is None,
                           scalars={"s": float(s[0])})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """z_{i+1} = z_i − (t_i − t_{i+1})·u(z_i, t_{i+1}, t_i) from z = t_0·noise (1 step: MeanFlow's 1-NFE sampler)."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # each jump's x0 bounded as the teacher's scheduler bounds it
    times = cfg.sample_times.get(num_steps) or default_sample_times(process, num_steps)
    net = sampling_net(nets)

    def u(x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        return average_velocity(net, process, x, t, r, cond)

    out = chain(u, noise.float(), times)
    return out.clamp(-1.0, 1.0) if cfg.clamp and teacher.vae is None else out


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): the jump to data z_0 = z_t - t u(z_t, t, 0) in sigma space,
    between the teacher's smallest level and the sampler's first."""
    from fewstep.editing import flow_map_denoiser

    cfg, teacher = ctx.method, nets.teacher
    process, net = teacher.process.for_sampler(), sampling_net(nets)
    t_max = default_sample_times(process, 1)[0]

    def u(x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        return average_velocity(net, process, x, t, r, cond)

    return flow_map_denoiser(u, process.sigma_min, t_max / (1 - t_max), clamp=cfg.clamp and teacher.vae is None)
