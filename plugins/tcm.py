"""Truncated Consistency Models (Lee, Xu, Geffner, Fanti, Kreis, Vahdat, Nie; ICLR 2025, arXiv 2410.14895).
Method ``tcm``: two stages, declared as phases.

1. ``consistency``: a standard consistency model on the whole range [sigma_min, sigma_max], trained as ECT
   does (consistency.md §4; TCM's stage 1 *is* the ECT code): t log-normal, r = t − Δt(t) on ECT's shrinking
   curriculum, target sg f(x0 + r·z, r) with the same z, weight 1/(t − r), pseudo-Huber/L2 norm.
2. ``truncated``: the same objective on the truncated range t in [t', sigma_max] only. The model is the
   composite of the student (sigma >= t') and the frozen stage-1 model (sigma < t') [CODE: NVlabs/TCM
   ``TCMPrecond``]: where r = t − Δt falls below t' the target comes from the stage-1 model. A fraction
   ``boundary_prob`` of each batch sits exactly at t = t' (the boundary loss: the student at t' against
   stage 1 just below), weighted by ``boundary_weight`` against the rest:
   L = mean_{t > t'} w·d + boundary_weight·mean_{t = t'} w·d [CODE: ``ct_training_loop.py``]. Without it the
   student can satisfy consistency inside [t', T] with any constant offset (the trivial solution the paper's
   boundary condition rules out; tests/test_tcm.py shows the offset is invisible to the truncated term).
   t ~ a truncated log-Student-t (heavy-tailed) on [t', sigma_max].

The stage-1 model is the network ``stage1``, kept equal to the evaluation EMA (the student without one) after
every stage-1 optimizer step, so it is the final stage-1 model when stage 2 starts, and a resumed run restores
it. The student continues from its own stage-1 weights. The official stage 2 loads both from one stage-1
snapshot [CODE: ``--transfer`` and ``--tcm_teacher_pkl`` name the same pickle; whether its network is the EMA
is UNVERIFIED]. Sampling: ECT's multistep sampler (levels sigma_max, t_mid, ...) on the composite model.

Facts [CODE: NVlabs/TCM README, ``ct_train.py``, ``training/loss.py``] (CIFAR-10): stage 1 P_mean −1.1,
P_std 2.0, q 2, ECT sigmoid mapping (k 8, b 1), ratio limit 0.999, weighting 1/Δt, c 1e-8 (≈ the L2 norm),
dropout 0.2; stage 2 t' = 1, P_mean 0, P_std 0.2, Student-t df 0.01, boundary_prob 0.25, boundary_weight 0.1,
lr 5e-5 (half of stage 1's 1e-4: ``stage2_lr_scale`` 0.5 on the one optimizer both stages share; the official
stage 2 is a new run from the stage-1 snapshot, so its Adam moments restart [UNVERIFIED: read from the README's
commands]; here they carry on). Stage-2 pairs use an exact per-batch count of boundary samples in the official
code; here each sample is a boundary sample with probability boundary_prob (independent of the number of
processes) and the two means become per-sample weights 1/(1 − p) and boundary_weight/p, equal in expectation.
Stage lengths are equal in iterations in the README.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from fewstep_plugins.tcm_config import TCMConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.consistency import (
    adaptive_loss,
    ect_r,
    ect_sample_levels,
    ect_stage,
    inverse_gap_weight,
    truncated_log_student_t,
    truncated_lognormal,
)
from fewstep.diffusion import append_dims, consistency_from_denoiser
from fewstep.hookspecs import hookimpl
from fewstep.nn import ema_update, frozen_copy, same_dropout
from fewstep.sampling import consistency_sample, sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]  # f(x (B, C, H, W), sigma (B,)) -> (B, C, H, W)
ECT_SIGMA_MAX = 80.0  # T of ECT / EDM / TCM (consistency.md §1)
STAGE1, STAGE2 = "consistency", "truncated"  # the phase names


# ---------------------------------------------------------------------------------------------
# Pure functions


def sigma_range(cfg: TCMConfig, process) -> tuple[float, float]:
    return cfg.sigma_min or process.sigma_min, cfg.sigma_max or min(ECT_SIGMA_MAX, process.sigma_max)


def capped_stage(nimg: int, cfg: TCMConfig) -> float:
    """ECT's curriculum stage a, capped where the Δt shrink 1 − q^-(a+1) reaches ``ratio_limit`` (TCM
    ``update_schedule`` clips the ratio; a fractional stage gives exactly the clipped ratio)."""
    return min(float(ect_stage(nimg, cfg.stage_nimg)), math.log(1 / (1 - cfg.ratio_limit), cfg.q) - 1)


def consistency_fn(net: nn.Module, process, cond: Cond | None, sigma_min: float) -> ConsistencyFn:
    """f(x, sigma): the network's denoiser with CM's exact boundary (f(x, sigma_min) = x)."""
    def f(x: Tensor, sigma: Tensor) -> Tensor:
        return consistency_from_denoiser(x, sigma, process.denoise(net, x, sigma, cond), sigma_min, process.sigma_data)

    return f


def composite_target(f_student: ConsistencyFn, f_stage1: ConsistencyFn | None, x_r: Tensor, r: Tensor,
                     transition: float, floor: float) -> Tensor:
    """sg f(x_r, r) of the composite model (TCMPrecond): the student where r >= t', the stage-1 model below
    (``f_stage1`` None: stage 1, the student everywhere), and x_r itself at the floor (f(x, sigma_min) = x).
    The stage-1 model runs only when some r is below t'. x_r: (B, C, H, W); r: (B,)."""
    out = f_student(x_r, r)
    if f_stage1 is not None:
        below = r < transition
        if bool(below.any()):  # host sync, once per step: skips the stage-1 pass when no pair crosses t'
            out = torch.where(append_dims(below, x_r.ndim), f_stage1(x_r, r), out)
    return torch.where(append_dims(r <= floor, x_r.ndim), x_r, out)


def stage2_weights(boundary: Tensor, boundary_prob: float, boundary_weight: float) -> Tensor:
    """Per-sample weights turning the batch mean into mean_{t > t'} + boundary_weight·mean_{t = t'} in
    expectation: 1/(1 − p) off the boundary, boundary_weight/p on it. boundary: (B,) bool."""
    return torch.where(boundary, boundary_weight / boundary_prob, 1.0 / (1.0 - boundary_prob)).float()


def draw_levels(cfg: TCMConfig, stage2: bool, lo: float, hi: float, step: StepInfo) -> tuple[Tensor, Tensor]:
    """(t, boundary) per sample: stage 1 truncated log-normal on [lo, hi]; stage 2 truncated log-Student-t on
    [t', hi] with a share boundary_prob moved to t = t' exactly."""
    if not stage2:
        t = step.draw(lambda n, g: truncated_lognormal(n, cfg.p_mean, cfg.p_std, lo, hi, g))
        return t, torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    t = step.draw(lambda n, g: truncated_log_student_t(n, cfg.p_mean_truncated, cfg.p_std_truncated, cfg.student_df,
                                                         cfg.transition_sigma, hi, g))
    boundary = step.rand() < cfg.boundary_prob
    return torch.where(boundary, torch.full_like(t, cfg.transition_sigma), t), boundary


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_extra_networks(ctx: RunContext, student: nn.Module) -> dict[str, nn.Module]:
    """``stage1``: the frozen stage-1 model below t' in stage 2 (kept equal to the stage-1 model until then)."""
    return {"stage1": frozen_copy(student).float()}


@hookimpl
def fewstep_sampling_networks(ctx: RunContext) -> list[str]:
    return ["stage1"]


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    """The recipe's student group; stage 2 runs at ``stage2_lr_scale`` times its learning rate."""
    scale = ctx.method.stage2_lr_scale
    return [OptimizerGroup.from_recipe(ctx.config.optimizer, lr_scale=lambda s: scale if s.phase == STAGE2 else 1.0)]


@hookimpl
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase]:
    names = tuple(g.name for g in groups)
    stage1 = round(ctx.method.stage1_fraction * ctx.config.train.total_nimg)
    return [Phase(STAGE1, names, duration_nimg=stage1), Phase(STAGE2, names, duration_nimg=None)]


@hookimpl
def fewstep_on_train_start(ctx: RunContext, nets: Nets) -> None:
    cfg = ctx.method
    lo, hi = sigma_range(cfg, nets.teacher.process)
    if not lo < cfg.transition_sigma < hi:
        raise ValueError(f"method.transition_sigma={cfg.transition_sigma} must lie in (sigma_min, sigma_max) = "
                         f"({lo:g}, {hi:g}); change it or method.sigma_min / sigma_max")


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """w(t, r)·d(f(x_t, t), sg f_composite(x0 + r·z, r)), times the stage-2 boundary weights."""
    cfg, process = ctx.method, nets.teacher.process
    if batch.x0 is None:
        raise ValueError("method 'tcm' trains on images (consistency training): the data source has none")
    lo, hi = sigma_range(cfg, process)
    stage2 = step.phase == STAGE2
    x0 = batch.x0.float()
    z = step.randn_like(x0)
    t, boundary = draw_levels(cfg, stage2, lo, hi, step)
    t = t.to(x0.dtype)
    r = ect_r(t, capped_stage(step.nimg, cfg), "sigmoid", cfg.q, cfg.k, cfg.b).clamp_min(lo)
    x_t, x_r = x0 + append_dims(t, x0.ndim) * z, x0 + append_dims(r, x0.ndim) * z
    f_student = consistency_fn(nets.student, process, batch.cond, lo)
    # The target pass first, as in plugins/cm.py: its intermediates are freed before the online pass keeps its own
    # for the backward (docs/SPEED.md). The student's target pass starts from the same random state as the online
    # pass either way (the stage-1 pass after it), so the values and dropout masks are the same.
    with same_dropout(), torch.no_grad():  # the online pass below draws the student target pass's dropout masks
        f_stage1 = consistency_fn(nets.extra["stage1"], process, batch.cond, lo) if stage2 else None
        target = composite_target(f_student, f_stage1, x_r, r, cfg.transition_sigma, lo)
    online = f_student(x_t, t)
    loss = inverse_gap_weight(t, r) * adaptive_loss(online - target, cfg.huber_c)
    terms = {"t": t.mean().detach(), "stage": capped_stage(step.nimg, cfg),
             "below_transition": (r < cfg.transition_sigma).float().mean()}
    if stage2:
        weights = stage2_weights(boundary, cfg.boundary_prob, cfg.boundary_weight)
        terms["boundary_loss"] = (loss * boundary).sum().detach() / boundary.sum().clamp_min(1)
        loss = loss * weights
    return LossOutput(loss=loss, terms=terms)


@hookimpl(trylast=True)  # after the ema plugin's update of this step
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets, step: StepInfo) -> None:
    """In stage 1, keep ``stage1`` equal to the model stage 2 will freeze (the evaluation EMA, or the student)."""
    if step.phase == STAGE1 and "student" in group.modules:
        ema_update(nets.extra["stage1"], sampling_net(nets), 0.0)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """ECT's multistep sampler on the composite model: the (EMA) student at levels >= t', stage 1 below."""
    cfg, process = ctx.method, nets.teacher.process.for_sampler()  # the teacher scheduler's x0 bound
    lo, hi = sigma_range(cfg, process)
    levels = cfg.sample_sigmas.get(num_steps) or ect_sample_levels(num_steps, cfg.t_mid, lo, hi)
    if len(levels) != num_steps:
        raise ValueError(f"method.sample_sigmas[{num_steps}] has {len(levels)} levels; expected {num_steps}")
    f_student = consistency_fn(sampling_net(nets), process, cond, lo)
    f_stage1 = consistency_fn(nets.extra["stage1"], process, cond, lo)

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        return f_student(x, sigma) if float(sigma[0]) >= cfg.transition_sigma else f_stage1(x, sigma)

    return consistency_sample(f, noise.float(), levels, 0.0, generator, clamp=cfg.clamp and nets.teacher.vae is None)


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): the composite consistency function of the sampler above."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, process = ctx.method, nets.teacher.process.for_sampler()
    lo, hi = sigma_range(cfg, process)
    f_student = consistency_fn(sampling_net(nets), process, cond, lo)
    f_stage1 = consistency_fn(nets.extra["stage1"], process, cond, lo)

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        return f_student(x, sigma) if float(sigma[0]) >= cfg.transition_sigma else f_stage1(x, sigma)

    return ConsistencyDenoiser(f, lo, hi, renoise_floor=0.0, clamp=cfg.clamp and nets.teacher.vae is None)
