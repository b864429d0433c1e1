"""Easy Consistency Tuning (``ect``) and Stable Consistency Tuning (``sct``): consistency models tuned
from a pretrained diffusion model without a teacher network in the loss. Maths:
specs/consistency.md §4 (ECT), §5 (SCT), §1 and §12 (pitfalls).

Everything is in sigma space (``fewstep.diffusion``): x = x0 + sigma * eps, so t and r below are
sigma-space levels and one implementation serves VP/DDPM, EDM and flow-matching teachers. For data in
[-1, 1] sigma space *is* EDM's space, so ECT's lognormal defaults (P_mean, P_std, T = 80) keep their
meaning; t is drawn from that lognormal truncated to the teacher's levels [sigma_min, sigma_max].

Parameterisation (the decision asked for by consistency.md §4.2). ECT's repository trains the plain
EDM denoiser and evaluates a sigma_min-shifted one, enforcing the boundary in the loss (target = x0
where r = 0). fewstep trains and samples ONE function, the exact-boundary consistency function
``consistency_from_denoiser`` (f(x, sigma_min) = x bit for bit), so training and sampling never
disagree. Its boundary is sigma_min, not 0, so r is floored at sigma_min: where ECT's r(t) falls
below it (r = 0 included), the target is the boundary value f(x_r, sigma_min) = x_r = x0 + sigma_min*z,
ECT's x0 up to the teacher's smallest noise level. Keeping ECT's literal x0 target under this
parameterisation would ask f to jump from x to x0 within a few sigma_min, where 1/(t - r) is largest.

SCT (§5) adds: (a) the variance-reduced target of the score identity, a self-normalised
importance-weighted posterior mean over a reference batch (§5.2); (b) phased training on segments of
the sigma axis with an edge-skipping sampler (§5.4-5.5, exact formula [UNVERIFIED]: the version here
is documented at ``edge_skipping_sample``); (c) guidance by an earlier EMA snapshot of itself (§5.6).
"""

from __future__ import annotations

import math

import torch
from fewstep_plugins.ect_config import ECTConfig, SCTConfig, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep.consistency import (
    adaptive_loss,
    ect_r,
    ect_sample_levels,
    ect_stage,
    inverse_gap_weight,
    truncated_lognormal,
)
from fewstep.diffusion import append_dims, consistency_from_denoiser, ddim_step
from fewstep.hookspecs import hookimpl
from fewstep.nn import frozen_copy, same_dropout
from fewstep.sampling import consistency_sample, sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

ECT_SIGMA_MAX = 80.0  # T of ECT / EDM (consistency.md §1)


# ---------------------------------------------------------------------------------------------
# Curricula and time sampling: pure functions


def sigma_range(cfg: ECTConfig, process) -> tuple[float, float]:
    return cfg.sigma_min or process.sigma_min, cfg.sigma_max or min(ECT_SIGMA_MAX, process.sigma_max)


def segments(cfg: ECTConfig, t: Tensor, sigma_min: float) -> tuple[Tensor, Tensor]:
    """Per sample (B,): the DDIM edge s_m of t's segment (s_m < t <= s_{m+1}; 0 for the first, whose
    map is the consistency function itself) and the floor of r (s_m, or sigma_min in the first)."""
    inner = getattr(cfg, "segment_edges", [])
    if not inner:
        return torch.zeros_like(t), torch.full_like(t, sigma_min)
    edges = torch.tensor([0.0, *inner], dtype=t.dtype, device=t.device)
    m = torch.searchsorted(edges[1:], t.contiguous())  # number of inner edges below t
    edge = edges[m]
    return edge, torch.where(m == 0, torch.full_like(t, sigma_min), edge)


def sample_levels(cfg: ECTConfig, num_steps: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Levels of the N-step ECT sampler: [sigma_max] + the first N-1 points of a Karras grid from t_mid.

    Continuous time has no grid: the student trains on t ~ lognormal(p_mean, p_std) truncated to [sigma_min,
    sigma_max], which puts density on every level; t_mid is the paper's choice (0.821 on CIFAR-10, at
    quantile 0.67 of ECT's ln t ~ N(-1.1, 2^2)), and the top level is where 1-step sampling starts."""
    if num_steps in cfg.sample_sigmas:
        levels = cfg.sample_sigmas[num_steps]
        if len(levels) != num_steps:
            raise ValueError(f"method.sample_sigmas[{num_steps}] has {len(levels)} levels; expected {num_steps}")
        return levels
    return ect_sample_levels(num_steps, cfg.t_mid, sigma_min, sigma_max)


# ---------------------------------------------------------------------------------------------
# SCT's stable target (consistency.md §5.2)


def condition_ids(cond: Cond | None) -> Tensor | None:
    """(B,) ids equal exactly for samples with the same condition (label, or identical text embedding);
    None for unconditional batches."""
    if cond is None or cond.is_empty:
        return None
    if cond.labels is not None:
        return cond.labels
    rows = (cond.embeddings if cond.embeddings is not None else cond.pooled).flatten(1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def stable_x0(x_t: Tensor, x0: Tensor, t: Tensor, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Self-normalised importance estimate of E[x0 | x_t] over the reference batch (SCT Eq. 14 [REVIEW]).

    x_t, x0: (B, C, H, W) with x_t^i = x0^i + t_i z_i; t: (B,); allowed: (B, B) bool, True where sample j
    may serve as a reference for sample i (the diagonal must be True). Returns x0_bar: (B, C, H, W),
    x0_bar_i = sum_j w_ij x0^j with w_ij = softmax_j(-|x_t^i - x0^j|^2 / (2 t_i^2)), and w_ii: (B,).
    Distances are computed in float64 (they are differenced at the scale of t^2 |z|^2).
    """
    a, b = x_t.flatten(1).double(), x0.flatten(1).double()
    d2 = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T
    logits = -d2 / (2 * t.double()[:, None] ** 2)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    w = torch.softmax(logits, dim=1)
    return (w @ b).to(x0.dtype).view_as(x0), w.diagonal().to(x0.dtype)


def reference_mask(cfg: SCTConfig, batch: Batch, step: StepInfo) -> Tensor | None:
    """(B, B) bool: j may serve as a reference for i (same block of the global batch, same condition)."""
    masks = []
    if (size := cfg.reference_size) is not None:
        if step.local_batch % size:
            raise ValueError(f"method.reference_size={size} must divide the per-process micro-batch "
                             f"({step.local_batch}); pick a divisor of it")
        block = (step.offset + torch.arange(step.local_batch, device=step.device)) // size
        masks.append(block[:, None] == block[None])
    if (ids := condition_ids(batch.cond)) is not None:
        masks.append(ids[:, None] == ids[None])
    return None if not masks else torch.stack(masks).all(0)


# ---------------------------------------------------------------------------------------------
# The consistency function and the loss


def denoised(net: nn.Module, process, x: Tensor, sigma: Tensor, cond: Cond | None, sigma_min: float,
             sigma_data: float) -> Tensor:
    """x0_hat(x, sigma): the network's sigma-space denoiser wrapped with CM's exact boundary (f(x, sigma_min) = x)."""
    return consistency_from_denoiser(x, sigma, process.denoise(net, x, sigma, cond), sigma_min, sigma_data)


def consistency_fn(net: nn.Module, process, x: Tensor, sigma: Tensor, edge: Tensor, cond: Cond | None,
                   sigma_min: float, sigma_data: float) -> Tensor:
    """f(x, sigma) onto the segment edge: x0_hat + edge (x - x0_hat) / sigma (PCM's DDIM form, §5.4);
    edge 0 gives x0_hat itself, and f(x, edge) = x for any network. x: (B, C, H, W); sigma, edge: (B,)."""
    return ddim_step(x, sigma, edge, denoised(net, process, x, sigma, cond, sigma_min, sigma_data))


def loss_weight(cfg: ECTConfig, t: Tensor, r: Tensor, sigma_data: float) -> Tensor:
    """ECT CIFAR-10 1/(t - r), or ECT ImageNet 1/t^2 + 1/sigma_d^2 (§4.4). A sample drawn exactly at its
    floor (t = r, probability ~1e-9) has online == target and gets weight 0 instead of 0/0."""
    if cfg.weighting == "snr_k":
        return 1 / t**2 + 1 / sigma_data**2
    return inverse_gap_weight(t, r)


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module | None:
    """Init from the teacher (ECT §4.1); with ``dropout`` set, every dropout layer of the copy gets p."""
    if ctx.method.dropout is None:
        return None  # the core default: an fp32 copy of the teacher
    import copy

    student = copy.deepcopy(teacher.net).float().requires_grad_(True).train()
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = ctx.method.dropout
    return student


@hookimpl
def fewstep_extra_networks(ctx: RunContext, student: nn.Module) -> dict[str, nn.Module]:
    """SCT's guiding snapshot (§5.6); no target network: the target is the stop-gradient student (§4.1)."""
    if getattr(ctx.method, "guidance_snapshot", None) is None:
        return {}
    return {"snapshot": frozen_copy(student).float()}


@hookimpl
def fewstep_sampling_networks(ctx: RunContext) -> list[str]:
    """A guided SCT sampler needs its snapshot: it travels with the export."""
    return ["snapshot"] if getattr(ctx.method, "guidance_snapshot", None) is not None else []


@hookimpl
def fewstep_on_train_start(ctx: RunContext, nets: Nets) -> None:
    cfg = ctx.method
    lo, hi = sigma_range(cfg, nets.teacher.process)
    edges = getattr(cfg, "segment_edges", [])
    if not lo < hi or (edges and not lo < edges[0] <= edges[-1] < hi):
        raise ValueError(f"method: need sigma_min < segment_edges < sigma_max, got sigma range ({lo:g}, {hi:g}) "
                         f"and segment_edges {edges}; set method.sigma_min / sigma_max or move the edges")


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """w(t, r) d(f(x_t, t), sg f(x_r, r)) with x_t = x0 + t z and, for ECT, x_r = x0 + r z (the same z);
    SCT replaces x0 and z by the stable x0_bar and z_bar = (x_t - x0_bar)/t (§5.2 step 3)."""
    cfg, process = ctx.method, nets.teacher.process
    if batch.x0 is None:
        raise ValueError(f"method {cfg.name!r} trains on images: the data source has none")
    lo, hi = sigma_range(cfg, process)
    sd = process.sigma_data
    x0 = batch.x0.float()
    z = step.randn_like(x0)
    t = step.draw(lambda n, g: truncated_lognormal(n, cfg.p_mean, cfg.p_std, lo, hi, g)).to(x0.dtype)
    stage = ect_stage(step.nimg, cfg.stage_nimg)
    edge, floor = segments(cfg, t, lo)
    r_ect = ect_r(t, stage, cfg.mapping, cfg.q, cfg.k, cfg.b)
    boundary = r_ect <= floor
    r = torch.where(boundary, floor, r_ect)
    x_t = x0 + append_dims(t, x0.ndim) * z
    terms = {"t": t.mean(), "boundary": boundary.float().mean(), "stage": float(stage)}
    ref, noise = x0, z
    if getattr(cfg, "stable_target", False):
        ref, w_self = stable_x0(x_t, x0, t, reference_mask(cfg, batch, step))
        noise = (x_t - ref) / append_dims(t, x0.ndim)
        terms["self_weight"] = w_self.mean()
    x_r = ref + append_dims(r, x0.ndim) * noise
    # The target pass first, as in plugins/cm.py: its intermediates are freed before the online pass keeps its own
    # for the backward (the other order holds both at once; docs/SPEED.md). The values are the same either way.
    with same_dropout(), torch.no_grad():  # the online pass below draws this pass's dropout masks
        target = consistency_fn(nets.student, process, x_r, r, edge, batch.cond, lo, sd)
        target = torch.where(append_dims(boundary, x0.ndim), x_r, target)  # f(x, floor) = x (exact boundary)
    online = consistency_fn(nets.student, process, x_t, t, edge, batch.cond, lo, sd)
    loss = loss_weight(cfg, t, r, sd) * adaptive_loss(online - target, cfg.huber_c)
    return LossOutput(loss=loss, terms={k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()})


@hookimpl(trylast=True)  # after the ema plugin's update of this step
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets, step: StepInfo) -> None:
    """Copy the evaluation EMA (the student without one) into ``snapshot`` once, at guidance_snapshot."""
    fraction = getattr(ctx.method, "guidance_snapshot", None)
    if fraction is None or "student" not in group.modules:
        return
    at = round(fraction * step.total_nimg)
    if step.nimg < at <= step.nimg + ctx.global_batch:
        source = sampling_net(nets)
        nets.extra["snapshot"].load_state_dict(source.state_dict())


# ---------------------------------------------------------------------------------------------
# Sampling


def guided(f_good: Tensor, f_bad: Tensor | None, w: float) -> Tensor:
    """f_bad + w (f_good - f_bad) (SCT §5.6, autoguidance form); f_bad None: f_good."""
    return f_good if f_bad is None else torch.lerp(f_bad, f_good, w)


def ect_sample(x0_hat, noise: Tensor, levels: list[float], generator: torch.Generator | None,
               clamp: bool) -> Tensor:
    """ECT's multistep sampler (§4.6): CM's, re-noising with tau z' (no sqrt(tau^2 - eps^2)), i.e. CM's
    sampler with sigma_min = 0. x0_hat: (x, sigma (B,)) -> (B, C, H, W)."""
    return consistency_sample(x0_hat, noise, levels, 0.0, generator, clamp)


def edge_skipping_sample(x0_hat, noise: Tensor, edges: list[float], sigma_min: float, sigma_max: float,
                         eta: float) -> Tensor:
    """Phased SCT sampling, one step per segment, deterministic (§5.4-5.5; fewstep's version of the
    unverified edge-skipping rule). From level t in segment m the step is the trained DDIM-form jump
    x <- x0_hat + tau (x - x0_hat) / t, to tau = s_m - eta (s_m - s_{m-1}) (s_0 := sigma_min): eta past
    the edge into the next segment, so the next evaluation is inside a segment rather than on the edge
    where two segment maps meet (Lipschitz continuity bounds the error, O(eta * segment length)). The last
    step returns x0_hat. eta = 0 is PCM's edge-to-edge sampler."""
    def level(t: float) -> Tensor:
        return torch.full((noise.shape[0],), t, device=noise.device, dtype=noise.dtype)

    lower = [sigma_min, *edges]
    x, t = noise * sigma_max, sigma_max
    for m in range(len(edges), 0, -1):  # segments M-1 ... 1, then the consistency function of segment 0
        t_next = lower[m] - eta * (lower[m] - lower[m - 1])
        x, t = ddim_step(x, level(t), t_next, x0_hat(x, level(t))), t_next
    return x0_hat(x, level(t))


def _sampler_x0(ctx: RunContext, nets: Nets, cond: Cond | None):
    """x0_hat(x, sigma) of the sampling student (SCT guidance: guided by the snapshot, 2 evaluations), with the
    sampler's level range (lo, hi); shared by the sampler and the editing denoiser."""
    cfg, process = ctx.method, nets.teacher.process.for_sampler()  # each network's x0 bounded, as the scheduler's
    lo, hi = sigma_range(cfg, process)
    good = sampling_net(nets)
    w = getattr(cfg, "guidance", 1.0)
    bad = nets.extra["snapshot"] if w != 1.0 else None

    def x0_hat(x: Tensor, sigma: Tensor) -> Tensor:
        f_good = denoised(good, process, x, sigma, cond, lo, process.sigma_data)
        f_bad = None if bad is None else denoised(bad, process, x, sigma, cond, lo, process.sigma_data)
        return guided(f_good, f_bad, w)

    return x0_hat, lo, hi


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """ECT's multistep sampler with the EMA student; SCT with M > 1 segments and num_steps = M uses the
    phased edge-skipping sampler; SCT guidance evaluates the snapshot too (2 evaluations per step)."""
    cfg = ctx.method
    x0_hat, lo, hi = _sampler_x0(ctx, nets, cond)
    edges = getattr(cfg, "segment_edges", [])
    clamp = cfg.clamp and nets.teacher.vae is None
    if edges and num_steps == len(edges) + 1:
        out = edge_skipping_sample(x0_hat, noise.float(), edges, lo, hi, cfg.eta)
        return out.clamp(-1, 1) if clamp else out
    return ect_sample(x0_hat, noise.float(), sample_levels(cfg, num_steps, lo, hi), generator, clamp)


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """One step, unguided: f(sigma_max z, sigma_max) is CM's parameterisation with sigma_min, so an EDM teacher in
    the OpenAI timestep convention (1000·¼·ln sigma, epsilon) samples with CMStochasticIterativeScheduler, and a
    teacher whose f at sigma_max is its denoiser (flow) with ``fewstep.export.one_step_sampler``. Multistep ECT
    re-noises with tau z (sigma_min = 0) where the stock consistency scheduler uses sqrt(tau^2 - sigma_min^2),
    on other levels: None, as for SCT's guided and edge-skipping samplers."""
    from fewstep.export import StockSampler, cm_boundary_coefficients, one_step_sampler

    cfg, teacher = ctx.method, nets.teacher
    p = teacher.process
    lo, hi = sigma_range(cfg, p)
    if num_steps != 1 or getattr(cfg, "guidance", 1.0) != 1.0 or sample_levels(cfg, 1, lo, hi) != [hi]:
        return None
    clip = cfg.clamp and teacher.vae is None
    if p.kind == "edm":
        if p.timestep_scale != 1000.0 or p.prediction_type != "epsilon":
            return None
        config = {"num_train_timesteps": 2, "sigma_min": lo, "sigma_max": hi, "sigma_data": p.sigma_data,
                  "s_noise": 1.0, "rho": 7.0, "clip_denoised": clip}
        return StockSampler("CMStochasticIterativeScheduler", config, 1, note="CM's one-step sampler at sigma_max")
    a, b = cm_boundary_coefficients(hi, lo, p.sigma_data)
    return one_step_sampler(p, hi, a, b, clip=clip)


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """For zero-shot editing (fewstep.editing): x0_hat of ECT's multistep sampler (guided as it is for SCT),
    re-noised from 0 as ECT's sampler. Phased SCT (segment edges) maps to its segment's edge, not to data:
    no editing."""
    from fewstep.editing import ConsistencyDenoiser

    cfg = ctx.method
    if getattr(cfg, "segment_edges", []):
        return None
    x0_hat, lo, hi = _sampler_x0(ctx, nets, cond)
    return ConsistencyDenoiser(x0_hat, lo, hi, renoise_floor=0.0, clamp=cfg.clamp and nets.teacher.vae is None)
