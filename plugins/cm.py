"""Consistency models: consistency distillation (``cd``, with the LCM-style variant), consistency
training (``ct``) and improved consistency training (``ict``). Maths: specs/consistency.md §1-3.

Everything is written in sigma space (``fewstep.diffusion``): x = x0 + sigma * eps with sigma the
teacher's noise-to-signal ratio, so the same code distils VP/DDPM, EDM and flow-matching teachers.
The consistency function wraps the network's denoiser with CM's boundary scalings,
f(x, sigma) = consistency_from_denoiser(x, sigma, D(x, sigma)), which is exactly CM's
parameterisation for an EDM network and gives f(x, sigma_min) = x for any teacher.
"""

from __future__ import annotations

import functools
import math

import torch
from fewstep_plugins.cm_config import CDConfig, CTConfig, ICTConfig, _Consistency, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep import selfcond
from fewstep.backbones import guidance_inputs
from fewstep.diffusion import (
    append_dims,
    consistency_from_denoiser,
    euler_step,
    heun_step,
    karras_sigmas,
    lcm_scalings,
)
from fewstep.hookspecs import hookimpl
from fewstep.losses import distance
from fewstep.nn import ema_update, frozen_copy, same_dropout, unwrap
from fewstep.sampling import consistency_sample, sampler_sigmas, sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

# ---------------------------------------------------------------------------------------------
# Curricula: pure functions of training progress (k / K).


def ct_num_scales(progress: float, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (CM §2.5)."""
    return math.ceil(math.sqrt(progress * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_decay(progress: float, s0: int, s1: int, mu0: float) -> float:
    """mu(k) = exp(s0 ln mu0 / (N(k) - 1)): the official code uses N - 1 in the exponent (CM §2.5)."""
    return math.exp(s0 * math.log(mu0) / (ct_num_scales(progress, s0, s1) - 1))


def ict_num_scales(progress: float, s0: int, s1: int) -> int:
    """N(k) = min(s0 * 2^floor(k/K'), s1) + 1 with K' = K / (log2 floor(s1/s0) + 1) (iCT §3)."""
    stages = math.log2(math.floor(s1 / s0)) + 1
    return min(s0 * 2 ** math.floor(progress * stages), s1) + 1


def ict_pair_probs(sigmas_asc: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(i) ∝ erf((ln s_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln s_i - P_mean) / (sqrt2 P_std)) (iCT §3)."""
    cdf = torch.erf((sigmas_asc.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return (p / p.sum()).float()


# ---------------------------------------------------------------------------------------------
# The consistency function


def _range(cfg: _Consistency, process) -> tuple[float, float]:
    return (cfg.sigma_min or process.sigma_min, cfg.sigma_max or process.sigma_max)


def consistency_fn(net: nn.Module, process, cfg: _Consistency, x: Tensor, sigma: Tensor, cond: Cond | None,
                   estimate: Tensor | None = None, **scalars: Tensor) -> Tensor:
    """f_theta(x, sigma): the network's sigma-space denoiser wrapped with boundary scalings (``estimate``:
    the x0 estimate of a self-conditioned network, zeros when None)."""
    x0 = process.denoise(net, x, sigma, cond, extra_input=estimate, **scalars)
    if getattr(cfg, "boundary", "cm") == "lcm":
        c_skip, c_out = lcm_scalings(process.sigma_to_t(sigma))
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * x0
    sigma_min, _ = _range(cfg, process)
    return consistency_from_denoiser(x, sigma, x0, sigma_min, cfg.sigma_data or process.sigma_data)


def cd_grid(cfg: CDConfig, process, device: torch.device | str = "cpu") -> Tensor:
    """Descending training levels on ``device``: Karras (CM §2.2) or the teacher's timesteps every ``skip``
    (LCM). Built once per (settings, teacher process, device) and shared: never modify it in place."""
    if cfg.grid == "teacher" and process.kind != "vp":
        raise ValueError(f"method.grid: 'teacher' needs a VP (DDPM) teacher, this teacher is {process.kind!r}; "
                         "use grid: karras")
    lo, hi = _range(cfg, process)
    return _cd_grid(cfg.grid, cfg.num_scales, cfg.skip, cfg.rho, lo, hi, process, torch.device(device))


@functools.lru_cache(maxsize=16)
def _cd_grid(kind: str, num_scales: int, skip: int, rho: float, lo: float, hi: float, process,
             device: torch.device) -> Tensor:
    if kind == "teacher":
        n = process.num_train_timesteps
        steps = torch.arange(n - 1, -1, -skip, dtype=torch.float64)  # 999, 979, ..., 19 for k = 20
        return process.t_to_sigma(steps).float().to(device)
    return karras_sigmas(num_scales, lo, hi, rho).to(device)


def trained_grid(cfg: _Consistency, process) -> Tensor:
    """Descending levels the student trained on at the end of training, from which the sampler takes its levels:
    CD's grid; CT's and iCT's final curriculum grid (N(K) Karras points)."""
    if cfg.name == "cd":
        return cd_grid(cfg, process)
    lo, hi = _range(cfg, process)
    n = ct_num_scales(1.0, cfg.s0, cfg.s1) if cfg.name == "ct" else ict_num_scales(1.0, cfg.s0, cfg.s1)
    return karras_sigmas(n, lo, hi, cfg.rho)


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module | None:
    cfg = ctx.method
    if getattr(cfg, "init", "teacher") == "random":
        from fewstep.backbones import Backbone

        student = Backbone.from_config_dict(teacher.net.config_dict()).float().train()
        if cfg.self_condition:
            student.enable_self_conditioning()
        return student
    if cfg.self_condition and not teacher.net.self_conditioning:
        import copy

        student = copy.deepcopy(teacher.net).float()
        student.enable_self_conditioning()
        if getattr(cfg, "guidance", None) is not None:
            student.add_scalar_inputs(["w"])
        return student.requires_grad_(True).train()
    if getattr(cfg, "guidance", None) is not None:
        if teacher.conditioning == "none" and not teacher.autoguided:
            raise ValueError("method.guidance: guided (LCM-style) distillation needs a class- or text-conditional "
                             "teacher, or a weaker checkpoint as teacher.autoguidance; this teacher is unconditional. "
                             "Remove method.guidance or set teacher.autoguidance.")
        import copy

        student = copy.deepcopy(teacher.net).float()
        student.add_scalar_inputs(["w"])
        return student.requires_grad_(True).train()
    return None  # the core default: a copy of the teacher


@hookimpl
def fewstep_extra_networks(ctx: RunContext, student: nn.Module) -> dict[str, nn.Module]:
    cfg = ctx.method
    needs_target = cfg.name == "ct" or (cfg.name == "cd" and cfg.target_ema > 0)
    return {"target": frozen_copy(student).float()} if needs_target else {}


@hookimpl
def fewstep_on_train_start(ctx: RunContext, nets: Nets) -> None:
    cfg = ctx.method
    if getattr(cfg, "boundary", "cm") == "lcm" and nets.teacher.process.kind != "vp":
        raise ValueError("method.boundary: 'lcm' scalings need a VP (DDPM) teacher; use boundary: cm")


def training_levels(cfg: _Consistency, process, step: StepInfo) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample (B,): the noisier level s_hi (online input), the cleaner s_lo (target input) and the
    loss weight lambda. CD: adjacent points of its fixed grid, lambda = 1 (CM §2.2). CT: the same on
    the N(k)-point Karras grid (CM §2.5). iCT: pairs drawn from the lognormal interval law on the
    N(k)-point grid, lambda = 1 / (s_hi - s_lo) (iCT §3)."""
    lo, hi = _range(cfg, process)
    if cfg.name == "ict":
        asc = karras_sigmas(ict_num_scales(step.progress, cfg.s0, cfg.s1), lo, hi, cfg.rho).flip(0)
        probs = ict_pair_probs(asc, cfg.p_mean, cfg.p_std)
        i = step.draw(lambda n, g: torch.multinomial(probs, n, replacement=True, generator=g)).cpu()
        s_lo, s_hi = asc[i], asc[i + 1]
        return s_hi.to(step.device), s_lo.to(step.device), (1.0 / (s_hi - s_lo)).to(step.device)
    if cfg.name == "cd":  # the grid lives on the device: no copy either way
        grid = cd_grid(cfg, process, step.device)
        n = step.randint(0, grid.numel() - 1).to(step.device)
        return grid[n], grid[n + 1], torch.ones(n.shape, device=step.device)
    grid = karras_sigmas(ct_num_scales(step.progress, cfg.s0, cfg.s1), lo, hi, cfg.rho)
    n = step.randint(0, grid.numel() - 1).cpu()
    return grid[n].to(step.device), grid[n + 1].to(step.device), torch.ones(n.shape, device=step.device)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """d(f_theta(x_hi, s_hi), stopgrad f_target(x_lo, s_lo)) weighted by lambda (CM Eq. 7 / iCT Eq. 8):
    CD reaches x_lo by one teacher ODE step from x_hi, CT and iCT by the same noise z at s_lo."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    if batch.x0 is None:
        raise ValueError(f"method {cfg.name!r} needs images: the data source has none")
    x0 = batch.x0.float()
    z = step.randn_like(x0)
    s_hi, s_lo, weight = training_levels(cfg, process, step)
    x_hi = x0 + append_dims(s_hi, x0.ndim) * z
    w = None
    if cfg.name == "cd":
        if cfg.guidance is not None:
            lo_w, hi_w = cfg.guidance
            w = step.rand().to(x0.device) * (hi_w - lo_w) + lo_w
        x_lo = teacher_step(teacher, cfg, batch, x_hi, s_hi, s_lo, w)
    else:
        x_lo = x0 + append_dims(s_lo, x0.ndim) * z  # CT estimator: the same z for both points
    scalars = guidance_inputs(w)
    target_net = nets.extra.get("target", nets.student)
    est_online = est_target = None
    if selfcond.enabled(nets.student):  # Analog Bits §6.1, the same samples for both passes
        use, clip = selfcond.mask(step), teacher.vae is None
        est_online = selfcond.training_estimate(process, nets.student, x_hi, s_hi, batch.cond, use, clip=clip, **scalars)
        est_target = selfcond.training_estimate(process, target_net, x_lo, s_lo, batch.cond, use, clip=clip, **scalars)
    # The target pass first: its intermediates are freed before the online pass keeps its own for the backward.
    # The other order holds both at once, which on the CPU doubled the page faults of a digits CD step (6 % of
    # its CPU time, docs/SPEED.md "Paired benchmark"); the values are the same either way.
    with same_dropout(), torch.no_grad():  # the online pass below reuses this pass's dropout masks
        target = consistency_fn(target_net, process, cfg, x_lo, s_lo, batch.cond, est_target, **scalars)
    online = consistency_fn(nets.student, process, cfg, x_hi, s_hi, batch.cond, est_online, **scalars)
    loss = weight * distance(online, target, cfg.distance, cfg.huber_c)
    return LossOutput(loss=loss, terms={"sigma_hi": s_hi.mean().detach()})


@torch.no_grad()
def teacher_step(teacher, cfg: CDConfig, batch: Batch, x_hi: Tensor, s_hi: Tensor, s_lo: Tensor,
                 w: Tensor | None) -> Tensor:
    """The teacher's ODE solve from s_hi to s_lo (CM §2.3 step 2: one step; ``substeps`` steps at the levels
    (s_hi^(1/rho) + u (s_lo^(1/rho) - s_hi^(1/rho)))^rho, u = j / substeps), with CFG scale w when guided (LCM)."""
    guided = w is not None

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        if guided:
            return teacher.denoise(x, sigma, batch.cond, uncond=batch.uncond, guidance=w).float()
        return teacher.denoise(x, sigma, batch.cond).float()

    k = cfg.substeps
    a, b = s_hi ** (1 / cfg.rho), s_lo ** (1 / cfg.rho)
    levels = [s_hi, *[(a + j / k * (b - a)) ** cfg.rho for j in range(1, k)], s_lo]
    x = x_hi
    for hi, lo in zip(levels, levels[1:]):
        if cfg.solver == "heun":  # every level of a CD grid is > 0: no final-step check (a host sync)
            x = heun_step(denoise, x, hi, lo, positive=True)
        else:
            x = euler_step(x, hi, lo, denoise(x, hi))
    return x


@hookimpl
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets, step: StepInfo) -> None:
    cfg = ctx.method
    target = nets.extra.get("target")
    if target is None or "student" not in group.modules:
        return
    if cfg.name == "ct":
        mu = ct_target_decay(step.progress, cfg.s0, cfg.s1, cfg.mu0)
    else:
        mu = cfg.target_ema
    ema_update(target, nets.student, mu)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """Multistep consistency sampling (CM Algorithm 1) with the EMA student when there is one."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # the teacher scheduler's x0 bound on D, before the boundary scalings
    lo, _ = _range(cfg, process)
    sigmas = sampler_sigmas(cfg.sample_sigmas, num_steps, trained_grid(cfg, process))
    net = sampling_net(nets)
    w = None
    if getattr(cfg, "guidance", None) is not None:
        w = torch.full((noise.shape[0],), cfg.sample_guidance, device=noise.device)
    scalars = guidance_inputs(w)

    def f(x: Tensor, sigma: Tensor, estimate: Tensor | None = None) -> Tensor:
        return consistency_fn(net, process, cfg, x, sigma, cond, estimate, **scalars)

    if selfcond.enabled(net):  # each step reads the previous step's output (Analog Bits §6.2)
        f = selfcond.RunningEstimate(f, clip=teacher.vae is None)
    return consistency_sample(f, noise.float(), sigmas, lo, generator, clamp=cfg.clamp and teacher.vae is None)


def sample_scalars(cfg: _Consistency) -> dict[str, float]:
    """The constant scalar inputs of the sampler (an LCM-style guided student's w), as the backbone gets them."""
    if getattr(cfg, "guidance", None) is None:
        return {}
    return {k: float(v[0]) for k, v in guidance_inputs(torch.full((1,), cfg.sample_guidance)).items()}


def boundary_coefficients(cfg: _Consistency, process, sigma: float) -> tuple[float, float]:
    """(a, b) with f(x, sigma) = a x + b D(x, sigma) for the plugin's boundary scalings (sigma space)."""
    from fewstep.export import cm_boundary_coefficients

    if getattr(cfg, "boundary", "cm") == "lcm":
        c_skip, c_out = lcm_scalings(process.sigma_to_t(torch.tensor([sigma], dtype=torch.float64)))
        return float(c_skip), float(c_out)
    return cm_boundary_coefficients(sigma, _range(cfg, process)[0], cfg.sigma_data or process.sigma_data)


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int) -> object:
    """The stock scheduler of the consistency sampler, where one reproduces it:
    - EDM teacher in the OpenAI timestep convention (1000·¼·ln sigma) with epsilon preconditioning, CM boundary
      scalings with the process's sigma_data and the default levels: CMStochasticIterativeScheduler whose
      num_train_timesteps is the M points of the trained Karras grid, so its own ``set_timesteps(N)`` (indices
      i * (M // N)) picks the levels ``grid_levels`` picks;
    - any other teacher, one step, where f at sigma_max is the denoiser itself (``fewstep.export.one_step_sampler``:
      the LCM boundary on VP teachers, flow teachers): LCMScheduler at timestep T - 1, FlowMatchLCMScheduler at
      t_max.
    Otherwise None: the multistep sampler re-noises to sqrt(tau^2 - sigma_min^2) with boundary scalings that no
    discrete stock scheduler applies (VP teachers: LCMScheduler re-noises to tau itself, so its multistep images
    differ from CM's, even on the same trained timesteps)."""
    from fewstep.export import StockSampler, one_step_sampler

    cfg, teacher = ctx.method, nets.teacher
    p = teacher.process
    if selfcond.enabled(unwrap(sampling_net(nets))):
        return None
    lo, hi = _range(cfg, p)
    grid = trained_grid(cfg, p)
    scalars = sample_scalars(cfg)
    if p.kind == "edm":
        if not (p.timestep_scale == 1000.0 and p.prediction_type == "epsilon" and cfg.sigma_data in (None, p.sigma_data)
                and getattr(cfg, "boundary", "cm") == "cm" and not cfg.sample_sigmas and grid.numel() >= num_steps):
            return None
        config = {"num_train_timesteps": grid.numel(), "sigma_min": lo, "sigma_max": hi,
                  "sigma_data": p.sigma_data, "s_noise": 1.0, "rho": cfg.rho,
                  "clip_denoised": cfg.clamp and teacher.vae is None}
        return StockSampler("CMStochasticIterativeScheduler", config, num_steps, scalars=scalars,
                            note="CM's multistep sampler (Algorithm 1) on its Karras grid")
    top = float(grid[0])
    if num_steps != 1 or cfg.sample_sigmas.get(1, [top]) != [top]:
        return None
    a, b = boundary_coefficients(cfg, p, top)
    return one_step_sampler(p, top, a, b, clip=cfg.clamp and teacher.vae is None, scalars=scalars)


@hookimpl
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None):
    """The consistency function f of the sampler above for zero-shot editing (CM Algorithm 4, fewstep.editing), with
    the sampler's own N levels (``method.sample_sigmas``, else ``grid_levels`` of the trained grid), so that an edit
    queries the levels the student trained on, as ``fewstep_sample`` does; SDEdit's start level stays the user's.
    Not for self-conditioned students, whose f reads the previous step's estimate."""
    from fewstep.editing import ConsistencyDenoiser

    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()
    net = sampling_net(nets)
    if selfcond.enabled(unwrap(net)):
        return None
    lo, hi = _range(cfg, process)
    w = None if getattr(cfg, "guidance", None) is None else torch.tensor([cfg.sample_guidance])

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        scalars = guidance_inputs(None if w is None else w.expand(x.shape[0]).to(x.device))
        return consistency_fn(net, process, cfg, x, sigma, cond, **scalars)

    grid = trained_grid(cfg, process)
    return ConsistencyDenoiser(f, lo, hi, renoise_floor=lo, clamp=cfg.clamp and teacher.vae is None, rho=cfg.rho,
                               levels=lambda n: sampler_sigmas(cfg.sample_sigmas, n, grid))
