"""Guided distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023): method
``guided``. Maths: specs/distribution.md §4 (stage 1 §4.2, stage 2 §4.3, samplers §4.4), §0.1 notation.

Stage 1 (phase ``distill-w``) trains a w-conditioned student, the teacher's backbone plus a
zero-initialised scalar input ``w`` (``Backbone.add_scalar_inputs``), to match the guided teacher over a
range of guidance weights. Stage 2 is progressive distillation (PD): phases ``halve-N`` for
N = start_steps/2, start_steps/4, ..., final_steps, in which the student learns to do in one DDIM step
what the previous round's model (the frozen extra network ``round_teacher``) does in two; at each phase
end the round's model is copied into ``round_teacher`` (`fewstep_on_phase_end`). The core's frozen
Teacher stays the original guided teacher throughout. The student keeps the teacher's output
parameterisation (e.g. v); every loss compares x0 predictions (`NoiseProcess.denoise`), as PD does.

Conventions. Guidance weights follow Meng et al.: x_w = (1 + w)·x_c − w·x_u, w = 0 unguided. fewstep's
guidance *scale* (``teacher.denoise(..., guidance=g)``, ``fewstep.diffusion.cfg``) is g = 1 + w. When
the teacher is autoguided (``teacher.autoguidance``: a weaker checkpoint replaces the unconditional
branch, spec §5.4), the same g = 1 + w is EDM2's guidance weight, so w ~ U[0, w_max] is §5.4's
g ~ U[1, 1 + w_max]. Everything is in
sigma space (``fewstep.diffusion``: x = x0 + sigma·eps, sigma = sigma_t/alpha_t), where DDIM is Euler
(`ddim_step`) and the forward process from level s to level s' > s adds noise of variance s'² − s².

Nested time grid (a fewstep choice; PD uses t = i/N on a cosine log-SNR schedule, §4.3 [C]). The finest
grid has ``start_steps`` steps: the Karras levels of ``start_steps`` points from the teacher's sigma_max
down to its sigma_min (EDM Eq. 5, rho = 7), followed by 0. The N-step grid is every
(start_steps/N)-th level of it, so every round's grid is every other level of the previous round's and
the last step of every grid lands on 0 (where DDIM returns the x0 prediction).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from fewstep_plugins.guided_config import (  # noqa: F401 - re-exported from the config module
    GuidedConfig,
    _is_power_of_two,
    fewstep_configure,
    fewstep_method_config,
    require_guidable,
    round_steps,
)
from torch import Tensor, nn

from fewstep.backbones import guidance_inputs
from fewstep.diffusion import append_dims, ddim_step, karras_sigmas, sample_ode
from fewstep.hookspecs import hookimpl
from fewstep.nn import ema_update, frozen_copy
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

STAGE1 = "distill-w"

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), sigma (B,)) -> x0 prediction (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Schedule: phases and grids, pure functions of the config (and of StepInfo.phase)


def phase_name(steps: int) -> str:
    return f"halve-{steps}"


def steps_of_phase(cfg: GuidedConfig, phase: str) -> int | None:
    """Student steps N of the round named ``phase`` (its round teacher takes 2N); None in stage 1."""
    if phase == STAGE1:
        return None
    for n in round_steps(cfg):
        if phase == phase_name(n):
            return n
    raise ValueError(f"phase {phase!r} is not a phase of method 'guided' (expected {STAGE1!r} or one of "
                     f"{[phase_name(n) for n in round_steps(cfg)]})")


def grid(cfg: GuidedConfig, process, num_steps: int) -> Tensor:
    """Descending levels of the nested N-step grid, (N + 1,) ending in 0 (module docstring)."""
    if not _is_power_of_two(num_steps) or num_steps > cfg.start_steps:
        raise ValueError(f"guided: {num_steps} steps is not on the nested grid; use a power of two <= "
                         f"method.start_steps={cfg.start_steps} (e.g. in validation.steps or --steps)")
    lo, hi = cfg.sigma_min or process.sigma_min, cfg.sigma_max or process.sigma_max
    finest = torch.cat([karras_sigmas(cfg.start_steps, lo, hi, cfg.rho), torch.zeros(1)])
    return finest[:: cfg.start_steps // num_steps]


# ---------------------------------------------------------------------------------------------
# Targets and loss


@torch.no_grad()
def stage1_target(teacher, x: Tensor, sigma: Tensor, cond: Cond, uncond: Cond | None, w: Tensor) -> Tensor:
    """Guided teacher x0 (§4.2): (1 + w)·x_c − w·x_u, both branches on the same x (one batched pass),
    i.e. fewstep scale g = 1 + w. With an autoguided teacher the weak model replaces x_u (§5.4)."""
    return teacher.denoise(x, sigma, cond, uncond=uncond, guidance=1.0 + w).float()


@torch.no_grad()
def pd_target(denoise: Denoiser, x: Tensor, s: Tensor, s_mid: Tensor, s_next: Tensor) -> Tensor:
    """x0 target of one student DDIM step s -> s_next that lands where two teacher DDIM steps
    s -> s_mid -> s_next land (§4.3 [C]). x: (B, C, H, W); levels: (B,).

    In sigma space a DDIM step with prediction x0 gives x' = x0 + (s'/s)(x − x0) (`ddim_step`), so
    x' = x_next is solved by x~ = (x_next − (s_next/s)·x) / (1 − s_next/s). This is the spec's
    x~ = (z'' − (sigma''/sigma) z)/(alpha'' − (sigma''/sigma) alpha) divided through by alpha'' with
    z = alpha·x. At the final step (s_next = 0) the target is the teacher's x0 at s_mid (§4.3 [C]).
    """
    x_mid = ddim_step(x, s, s_mid, denoise(x, s))
    x0_mid = denoise(x_mid, s_mid)
    x_next = ddim_step(x_mid, s_mid, s_next, x0_mid)
    r = append_dims(s_next / s, x.ndim)
    target = (x_next - r * x) / (1 - r)
    return torch.where(append_dims(s_next == 0, x.ndim), x0_mid, target)


def weighted_error(pred: Tensor, target: Tensor, sigma: Tensor, weighting: str) -> Tensor:
    """Per-sample loss (B,) between x0 predictions (B, C, H, W) at sigma-space levels sigma (B,).

    snr_trunc: max(mean dx², mean deps²) (§4.3 [C]); eps = (x − x0)/sigma at the same x, so
    deps = −dx/sigma and the loss is max(1, 1/sigma²)·mean dx², i.e. max(SNR, 1) weighting.
    """
    mse = (pred - target).flatten(1).float().square().mean(1)
    if weighting == "x":
        return mse
    return mse * torch.clamp(sigma.float() ** -2, min=1.0)


# ---------------------------------------------------------------------------------------------
# Samplers


def renoise(x: Tensor, s_lo: Tensor, s_hi: Tensor, generator: torch.Generator | None) -> Tensor:
    """Forward process from level s_lo to s_hi >= s_lo: x + sqrt(s_hi² − s_lo²)·z (§4.4 q(z_t | z_s) in
    sigma space: sigma²_{t|s}/alpha_t² = s_hi² − s_lo²). x: (B, C, H, W); levels scalar or (B,)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    scale = torch.sqrt(torch.as_tensor(s_hi, dtype=x.dtype) ** 2 - torch.as_tensor(s_lo, dtype=x.dtype) ** 2)
    return x + append_dims(scale.reshape(-1).to(x.device), x.ndim) * z


def stochastic_sample(denoise: Denoiser, noise: Tensor, levels: Tensor, generator: torch.Generator | None) -> Tensor:
    """Meng et al.'s stochastic N-step sampler (§4.4) on ``levels`` h_0 > ... > h_N = 0; N evaluations.

    Iteration k < N − 1: a deterministic DDIM step of twice the nominal length, h_k -> h_{k+2}, then a
    stochastic step back to h_{k+1} with the forward process (`renoise`). Boundary handling (unverified in
    the spec; fewstep's choice): start from noise·h_0; the jump that reaches h_N = 0 returns the x0
    prediction, which the back step re-noises to h_{N−1}; the last iteration is a plain deterministic step
    h_{N−1} -> 0. N = 1 is therefore one DDIM step. Each jump spans two nominal steps, so the N-step
    stochastic sampler suits the N/2-step student (the spec's "simplest faithful choice").
    noise: (B, C, H, W) standard normal; levels: (N + 1,). Returns x0 samples (B, C, H, W).
    """
    x = noise * levels[0]
    n = levels.numel() - 1
    for k in range(n - 1):
        x = ddim_step(x, levels[k], levels[k + 2], denoise(x, levels[k]))
        x = renoise(x, levels[k + 2], levels[k + 1], generator)
    return denoise(x, levels[n - 1])


# ---------------------------------------------------------------------------------------------
# Hooks


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    """The teacher's backbone plus a zero-initialised ``w`` input: at step 0 it is the conditional teacher."""
    require_guidable(teacher.source, teacher.conditioning, teacher.autoguided)
    student = copy.deepcopy(teacher.net).float()
    student.add_scalar_inputs(["w"])
    return student.requires_grad_(True).train()


def kept_name(steps: int) -> str:
    return f"steps_{steps}"


def kept_steps(cfg: GuidedConfig) -> list[int]:
    """The intermediate rounds whose model is kept (``keep_steps``; default 2 and 4 where they are rounds)."""
    if cfg.keep_steps is not None:
        return list(cfg.keep_steps)
    return [k for k in (2, 4) if k in round_steps(cfg)[:-1]]


@hookimpl
def fewstep_extra_networks(ctx: RunContext, student: nn.Module) -> dict[str, nn.Module]:
    """``round_teacher``: the frozen teacher of the current halving round (checkpointed, so a resumed run
    continues mid-round with the same teacher); ``steps_N``: the kept model of round N (`keep_steps`),
    with a ``round_done`` flag that the hand-over sets (checkpointed with it)."""
    if not round_steps(ctx.method):
        return {}
    nets = {"round_teacher": frozen_copy(student).float().eval()}
    for k in kept_steps(ctx.method):
        nets[kept_name(k)] = frozen_copy(student).float().eval()
        nets[kept_name(k)].register_buffer("round_done", torch.zeros((), dtype=torch.bool))
    return nets


@hookimpl
def fewstep_sampling_networks(ctx: RunContext) -> list[str]:
    return [kept_name(k) for k in kept_steps(ctx.method)]


@hookimpl
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup]:
    """The recipe's student group, with PD's per-round linear annealing (`anneal_lr`) as its lr_scale."""
    o = ctx.config.optimizer
    if not ctx.method.anneal_lr:
        return [OptimizerGroup.from_recipe(o)]
    return [OptimizerGroup.from_recipe(o, lr_scale=lambda s: 1.0 if s.phase == STAGE1 else 1.0 - s.phase_progress)]


@hookimpl
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase]:
    """distill-w, then one phase per halving round, all on one optimizer (PD's per-round linear annealing of
    the learning rate to 0, §4.3 [C], is the group's ``lr_scale``, see ``fewstep_optimizer_groups``)."""
    names = tuple(g.name for g in groups)
    cfg = ctx.method
    return [Phase(STAGE1, names, cfg.stage1_nimg)] + [Phase(phase_name(n), names, cfg.round_nimg)
                                                      for n in round_steps(cfg)]


@hookimpl
def fewstep_on_phase_end(ctx: RunContext, phase: Phase, nets: Nets) -> None:
    """Hand over (§4.3: eta_T <- eta_S, and the next student starts as its teacher): the model of the ended
    phase becomes the next round's teacher and the next round's initial student. That model is the
    sampling network: the raw student, as in PD (no EMA, §4.3 [C]), or the evaluation EMA when it is
    enabled; the EMA then restarts with the new round. Nothing happens after the last round (the
    trainer also ends the last phase when training ends)."""
    rounds = round_steps(ctx.method)
    if not rounds or phase.name == phase_name(rounds[-1]):
        return
    final = sampling_net(nets)
    n = steps_of_phase(ctx.method, phase.name)
    if n in kept_steps(ctx.method):
        kept = nets.extra[kept_name(n)]
        ema_update(kept, final, 0.0)
        kept.round_done.fill_(True)
    ema_update(nets.extra["round_teacher"], final, 0.0)
    if final is not nets.student:
        ema_update(nets.student, final, 0.0)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Stage 1: match the guided teacher at x = x0 + sigma·eps, sigma from the teacher's pretraining
    distribution (§4.2: t ~ U[0, 1]). Stage 2: match the x0 target of two round-teacher DDIM steps from a
    student grid level (§4.3). Both with w ~ U[w_min, w_max] per sample and `weighted_error`."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process
    if batch.x0 is None:
        raise ValueError("method 'guided' needs images (x ~ data, §4.2-4.3): the data source has none")
    x0 = batch.x0.float()
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * step.rand()
    eps = step.randn_like(x0)
    n = steps_of_phase(cfg, step.phase)
    if n is None:
        sigma = process.t_to_sigma(step.draw(lambda b, g: process.sample_train_t(b, g))).float().to(x0.device)
        x = x0 + append_dims(sigma, x0.ndim) * eps
        target = stage1_target(teacher, x, sigma, batch.cond, batch.uncond, w)
    else:
        levels = grid(cfg, process, 2 * n).to(x0.device)  # the round teacher's grid
        j = step.randint(0, n)  # student step j: levels 2j -> 2j + 2
        sigma = levels[2 * j]
        x = x0 + append_dims(sigma, x0.ndim) * eps
        round_teacher = nets.extra["round_teacher"]
        # The round teacher's two DDIM steps are its sampler's (fewstep_sample), which bounds x0 as the teacher's
        # scheduler does; stage 1's target (Teacher.denoise) is bounded too. The student's prediction is not.
        sampler = process.for_sampler()

        def denoise(x_: Tensor, s_: Tensor) -> Tensor:
            return sampler.denoise(round_teacher, x_, s_, batch.cond, **guidance_inputs(w)).float()

        target = pd_target(denoise, x, sigma, levels[2 * j + 1], levels[2 * j + 2])
    pred = process.denoise(nets.student, x, sigma, batch.cond, **guidance_inputs(w)).float()
    loss = weighted_error(pred, target, sigma, cfg.weighting)
    return LossOutput(loss=loss, terms={"sigma": sigma.mean().detach(), "w": w.mean().detach()})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """N-step DDIM (§4.4) or the stochastic sampler on the nested grid, with w = ``sample_w``; with the
    model kept for N steps (`keep_steps`) once its round has ended, else the current student. The
    stochastic sampler's jumps span two nominal steps, so it uses the model distilled for N/2 steps."""
    cfg, teacher = ctx.method, nets.teacher
    process = teacher.process.for_sampler()  # DDIM steps with the bounded x0 (the teacher's targets' form)
    net = sampling_net(nets)
    model_steps = num_steps // 2 if cfg.sampler == "stochastic" and num_steps > 1 else num_steps
    kept = nets.extra.get(kept_name(model_steps))
    if kept is not None and bool(getattr(kept, "round_done", True)):  # an export's kept models are all done
        net = kept
    scalars = guidance_inputs(torch.full((noise.shape[0],), cfg.sample_w, device=noise.device))
    clip = cfg.clip and teacher.vae is None
    levels = grid(cfg, process, num_steps).to(noise.device)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = process.denoise(net, x, sigma, cond, **scalars).float()
        return x0.clamp(-1.0, 1.0) if clip else x0

    if cfg.sampler == "stochastic":
        return stochastic_sample(denoise, noise.float(), levels, generator)
    return sample_ode(denoise, noise.float() * levels[0], levels, "ddim")


@hookimpl
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int):
    """DDIM in sigma space is Euler: on an EDM teacher (timestep ¼·ln sigma) diffusers' EDMEulerScheduler runs
    the deterministic sampler, at w = ``sample_w`` folded into the student, where its own N-level Karras grid is
    the nested grid's (N = 1 and N = start_steps). None for VP teachers (the nested Karras levels fall between
    their timesteps), the stochastic sampler and pixel clipping (EDMEulerScheduler does not clip)."""
    from fewstep.export import StockSampler

    cfg, teacher = ctx.method, nets.teacher
    p = teacher.process
    if (p.kind != "edm" or p.timestep_scale != 1.0 or cfg.sampler != "ddim" or (cfg.clip and teacher.vae is None)
            or num_steps not in (1, cfg.start_steps)):
        return None
    sigma_max = cfg.sigma_max or p.sigma_max
    config = {"sigma_min": cfg.sigma_min or p.sigma_min, "sigma_max": sigma_max, "sigma_data": p.sigma_data,
              "sigma_schedule": "karras", "rho": cfg.rho, "prediction_type": p.prediction_type,
              "final_sigmas_type": "zero", "num_train_timesteps": 1000}
    scalars = {k: float(v[0]) for k, v in guidance_inputs(torch.full((1,), cfg.sample_w)).items()}
    return StockSampler("EDMEulerScheduler", config, num_steps, scalars=scalars,
                        latents_scale=sigma_max / (sigma_max**2 + 1) ** 0.5,  # its init_noise_sigma is sqrt(s^2 + 1)
                        note="DDIM = Euler on EDM's Karras grid, the student's w fixed at sample_w")
