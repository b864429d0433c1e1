"""Diffusion maths, written once, in the EDM "sigma space".

Every supported teacher process has the form x_t = alpha(t)·x0 + sigma(t)·eps in its own time t.
Dividing by alpha(t) gives the variance-exploding (VE / EDM) form

    x = x_t / alpha(t) = x0 + sigma·eps,    sigma := sigma(t) / alpha(t)   (noise-to-signal ratio),

in which the probability-flow ODE is dx/dsigma = (x − D(x, sigma))/sigma (EDM Eq. 3 with s = 1),
DDIM is exactly Euler, and the consistency boundary scalings are those of CM §1. Methods are written
once against `NoiseProcess.denoise` (a sigma-space denoiser) and so serve VP/DDPM, EDM and
flow-matching teachers alike. The subclasses only translate between sigma space and what the
teacher's network sees (its input scaling, its `timestep`, its output parameterisation).

Papers cited: EDM = Karras et al. 2022 (arXiv 2206.00364); CM = Song et al. 2023 and
`/work/shared/specs/consistency.md` (§ numbers refer to that spec); DDIM = Song et al. 2021;
SD3 = Esser et al. 2024 (rectified-flow time sampling).

Conventions: images are (B, C, H, W) (any trailing shape works); a per-sample noise level is (B,);
a 0-d tensor or a Python float is broadcast to the batch. New tensors (grids, sampled times) are
created on the CPU in torch's default dtype; everything else follows its inputs' device and dtype
(half-precision and integer times are promoted to float32 so table look-ups stay accurate).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EDMProcess",
    "FlowProcess",
    "NoiseProcess",
    "VPProcess",
    "append_dims",
    "cfg",
    "cm_scalings",
    "consistency_from_denoiser",
    "ddim_step",
    "edm_scalings",
    "eps_from_x0",
    "euler_step",
    "heun_step",
    "karras_sigmas",
    "lcm_scalings",
    "lognormal_sigmas",
    "process_from_scheduler_config",
    "sample_ode",
    "score_from_x0",
    "velocity_from_x0",
    "X0Clip",
    "x0_from_eps",
]

# A sigma-space denoiser: (x: (B, C, H, W), sigma: (B,)) -> x0 prediction (B, C, H, W).
DenoiseFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that ``x`` has ``ndim`` dims: (B,) -> (B, 1, 1, 1)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(
            f"append_dims: input has {x.ndim} dims ({tuple(x.shape)}) but target ndim is {ndim}; "
            "pass a per-sample tensor (B,) and the ndim of the image it scales."
        )
    return x.reshape(*x.shape, *([1] * missing))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 stay; integer and half-precision times are promoted to float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as_time(t: Tensor | float) -> Tensor:
    """A time or noise level as a floating tensor (see `_work_dtype`)."""
    t = torch.as_tensor(t)
    return t.to(_work_dtype(t.dtype))


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """``v`` as a (B,) tensor on ``x``'s device, for a batch ``x: (B, ...)``; a scalar is broadcast."""
    v = torch.as_tensor(v, dtype=_work_dtype(x.dtype), device=x.device)
    if v.ndim == 0:
        return v.expand(x.shape[0])
    if v.shape != (x.shape[0],):
        raise ValueError(
            f"noise level has shape {tuple(v.shape)} but the batch has {x.shape[0]} samples; "
            "pass one level per sample, shape (B,), or a scalar."
        )
    return v


def _bc(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample (B,) or scalar coefficient against ``like: (B, C, H, W)``.

    The coefficient is moved to ``like``'s device and work dtype, so a float64 time never silently
    promotes a float32 image to float64.
    """
    return append_dims(v.to(like.device, _work_dtype(like.dtype)), like.ndim)


def _grid(values: Tensor) -> Tensor:
    """Cast a float64 grid computed on the CPU to torch's default dtype."""
    return values.to(torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# Sigma-space conversions (EDM Eq. 3; CM §1). x, x0: (B, C, H, W); sigma: (B,) or scalar.
# ---------------------------------------------------------------------------------------------


def eps_from_x0(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Noise implied by a clean prediction: eps = (x − x0)/sigma, since x = x0 + sigma·eps."""
    return (x - x0) / _bc(_per_sample(sigma, x), x)


def x0_from_eps(x: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Clean sample implied by a noise prediction: x0 = x − sigma·eps."""
    return x - _bc(_per_sample(sigma, x), x) * eps


def score_from_x0(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Score of p(x; sigma) from the denoiser (Tweedie; EDM Eq. 3): ∇log p = (x0 − x)/sigma²."""
    s = _bc(_per_sample(sigma, x), x)
    return (x0 - x) / s**2


def velocity_from_x0(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """PF-ODE velocity dx/dsigma = (x − x0)/sigma (EDM Eq. 3 in sigma space; CM §1)."""
    return (x - x0) / _bc(_per_sample(sigma, x), x)


# ---------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras grid of ``n`` levels, descending: index 0 = sigma_max, index n−1 = sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(n−1)·(sigma_min^(1/rho) − sigma_max^(1/rho)))^rho (EDM Eq. 5;
    CM §1). rho = 7 is EDM's value. Returns (n,) in the default dtype; n = 1 gives [sigma_max].
    """
    if n < 1:
        raise ValueError(f"karras_sigmas: n must be >= 1, got {n}.")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"karras_sigmas: need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return _grid((hi + ramp * (lo - hi)) ** rho)


def lognormal_sigmas(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None) -> Tensor:
    """``n`` noise levels with ln sigma ~ N(p_mean, p_std²) (EDM §5, Table 1: −1.2, 1.2). CPU, (n,)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return _grid(torch.exp(p_mean + p_std * z))


# ---------------------------------------------------------------------------------------------
# ODE steps in sigma space. x, x0: (B, C, H, W); sigma, sigma_next: (B,) or scalar.
# ---------------------------------------------------------------------------------------------


def euler_step(x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, x0: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = (x − x0)/sigma from sigma to sigma_next (EDM Alg. 1 l. 5–6)."""
    s, sn = _bc(_per_sample(sigma, x), x), _bc(_per_sample(sigma_next, x), x)
    return x + (sn - s) * (x - x0) / s


def ddim_step(x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, x0: Tensor) -> Tensor:
    """Deterministic DDIM step (DDIM Eq. 12, eta = 0) in sigma space: x0 + sigma_next·eps_hat.

    With eps_hat = (x − x0)/sigma this equals `euler_step` algebraically: DDIM is Euler in sigma space.
    """
    s, sn = _bc(_per_sample(sigma, x), x), _bc(_per_sample(sigma_next, x), x)
    return x0 + sn * (x - x0) / s


def heun_step(
    denoise_fn: DenoiseFn,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    x0: Tensor | None = None,
    *,
    positive: bool = False,
) -> Tensor:
    """Heun (2nd-order) step from sigma to sigma_next (EDM Alg. 1 l. 5–8).

    ``x0 = denoise_fn(x, sigma)`` may be passed to save an evaluation. Samples whose sigma_next is 0
    take the Euler step (EDM Alg. 1 l. 7: no correction at the last step), so the denoiser is never
    evaluated at sigma = 0; it is called with their own sigma instead and the result discarded.
    ``positive``: the caller knows every sigma_next > 0 (a training grid), so the check is skipped.
    """
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    if x0 is None:
        x0 = denoise_fn(x, s)
    d = velocity_from_x0(x, x0, s)
    x_euler = x + _bc(sn - s, x) * d
    if positive:  # no host-device sync on a training step
        return x + _bc(sn - s, x) * 0.5 * (d + velocity_from_x0(x_euler, denoise_fn(x_euler, sn), sn))
    last = sn == 0
    # One host-device sync per step; it saves a whole network evaluation on the final step.
    if bool(last.all()):
        return x_euler
    sn_eval = torch.where(last, s, sn)
    d_next = velocity_from_x0(x_euler, denoise_fn(x_euler, sn_eval), sn_eval)
    x_heun = x + _bc(sn - s, x) * 0.5 * (d + d_next)
    return torch.where(append_dims(last, x.ndim), x_euler, x_heun)


_SOLVERS = ("euler", "ddim", "heun")


def sample_ode(denoise_fn: DenoiseFn, x: Tensor, sigmas: Tensor, solver: str = "euler") -> Tensor:
    """Integrate the PF-ODE dx/dsigma = (x − D(x, sigma))/sigma along a descending grid.

    x: (B, C, H, W) at level sigmas[0] (for pure noise: sigmas[0]·eps). sigmas: (K+1,) descending,
    usually ending in 0 (then the result is a clean sample). solver: "euler", "ddim" (identical
    maths, kept for readability at call sites) or "heun" (EDM Alg. 1). Returns x at sigmas[-1].
    """
    if solver not in _SOLVERS:
        raise ValueError(f"sample_ode: unknown solver {solver!r}; choose one of {_SOLVERS}.")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sample_ode: sigmas must be 1-D with at least 2 levels (start and end), got shape {tuple(sigmas.shape)}."
        )
    sigmas = sigmas.to(x.device, _work_dtype(x.dtype))
    for i in range(sigmas.numel() - 1):
        s, sn = _per_sample(sigmas[i], x), _per_sample(sigmas[i + 1], x)
        x0 = denoise_fn(x, s)
        if solver == "heun":
            x = heun_step(denoise_fn, x, s, sn, x0)
        elif solver == "ddim":
            x = ddim_step(x, s, sn, x0)
        else:
            x = euler_step(x, s, sn, x0)
    return x


def cfg(cond_out: Tensor, uncond_out: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond) (Ho & Salimans 2022, Eq. 6, scale = 1 + w).

    Works on any linear parameterisation (x0, eps, v, flow). cond_out, uncond_out: (B, C, H, W);
    scale: float or (B,). `torch.lerp` makes scale 1 return cond_out and scale 0 uncond_out exactly.
    """
    if isinstance(scale, Tensor):
        scale = append_dims(scale.to(cond_out.device, cond_out.dtype), cond_out.ndim)
    return torch.lerp(uncond_out, cond_out, scale)


# ---------------------------------------------------------------------------------------------
# Boundary scalings
# ---------------------------------------------------------------------------------------------


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """EDM preconditioning (EDM Table 1; CM §1): c_skip, c_out, c_in, each shaped like ``sigma``."""
    denom = sigma**2 + sigma_data**2
    return sigma_data**2 / denom, sigma * sigma_data / denom.sqrt(), denom.rsqrt()


def cm_scalings(sigma: Tensor, sigma_min: float, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """Consistency boundary scalings (CM §1; CM paper App. C): c_skip, c_out shaped like ``sigma``.

    c_skip = sd²/((sigma − eps)² + sd²), c_out = (sigma − eps)·sd/√(sigma² + sd²), eps = sigma_min,
    so that c_skip(eps) = 1 and c_out(eps) = 0: f(x, eps) = x exactly.
    """
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_from_denoiser(
    x: Tensor, sigma: Tensor | float, x0: Tensor, sigma_min: float, sigma_data: float = 0.5
) -> Tensor:
    """Consistency function f(x, sigma) with the exact boundary condition, from a denoiser output.

    x, x0: (B, C, H, W) with x0 = D(x, sigma); sigma: (B,) or scalar.

    Derivation (CM §1): a network trained as an EDM denoiser has D = c_skip_edm·x + c_out_edm·F, so
    its raw output is F = (x0 − c_skip_edm·x)/c_out_edm. CM's parameterisation of the same F is
    f = c_skip_cm·x + c_out_cm·F. Substituting, with r = c_out_cm/c_out_edm = (sigma − sigma_min)/sigma
    (the √(sigma² + sd²)·sd factors cancel):

        f = (c_skip_cm − r·c_skip_edm)·x + r·x0.

    For an EDM network this is exactly CM's parameterisation; for any denoiser, at sigma = sigma_min
    c_skip_cm = 1 and r = 0 exactly, so f(x, sigma_min) = x bit for bit.
    """
    s = _per_sample(sigma, x)
    c_skip_cm, _ = cm_scalings(s, sigma_min, sigma_data)
    c_skip_edm = sigma_data**2 / (s**2 + sigma_data**2)
    r = (s - sigma_min) / s
    return _bc(c_skip_cm - r * c_skip_edm, x) * x + _bc(r, x) * x0


def lcm_scalings(
    timestep: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """LCM boundary scalings on the DDPM timestep index (consistency.md §10.1): c_skip, c_out.

    With tau = timestep_scaling·t: c_skip = sd²/(tau² + sd²), c_out = tau/√(tau² + sd²). The default
    scaling 10 and sd = 0.5 are those of the diffusers LCM scripts.
    """
    tau = timestep_scaling * _as_time(timestep)
    denom = tau**2 + sigma_data**2
    return sigma_data**2 / denom, tau / denom.sqrt()


# ---------------------------------------------------------------------------------------------
# x0 clipping of diffusers' DDPM-family schedulers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class X0Clip:
    """A teacher scheduler's bound on its x0 prediction, as diffusers' DDPM / DDIM / LCM schedulers apply it
    in every ``step`` (step 4 of ``DDIMScheduler.step``; TCDScheduler takes the keys, but its ``step`` ignores
    them): dynamic thresholding (Imagen, Saharia et al. 2022 §2.3) when ``thresholding``, else clamping to
    ±``clip_sample_range`` when ``clip_sample``, else nothing.

    Field names, meanings and defaults are those of the diffusers scheduler configs (checked against 0.42.1); the
    defaults here describe a scheduler that bounds nothing. Dynamic thresholding: per sample, s = the
    ``dynamic_thresholding_ratio`` quantile of |x0| over all its pixels, clamped to [1, ``sample_max_value``];
    x0 -> clamp(x0, −s, s)/s.
    """

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @property
    def active(self) -> bool:
        """Whether this changes any x0 at all."""
        return self.clip_sample or self.thresholding

    def __call__(self, x0: Tensor) -> Tensor:
        """The bounded x0: (B, C, H, W) -> (B, C, H, W), same dtype."""
        if self.thresholding:
            flat = x0.float().flatten(1)
            s = torch.quantile(flat.abs(), self.dynamic_thresholding_ratio, dim=1).clamp(1.0, self.sample_max_value)
            s = s[:, None]
            return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape).to(x0.dtype)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def config(self) -> dict[str, Any]:
        """The five diffusers scheduler keys."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.thresholding:
            return (f"x0 dynamically thresholded (ratio {self.dynamic_thresholding_ratio:g}, "
                    f"max {self.sample_max_value:g})")
        return f"x0 clipped to ±{self.clip_sample_range:g}" if self.clip_sample else "x0 not clipped"


# ---------------------------------------------------------------------------------------------
# Noise processes
# ---------------------------------------------------------------------------------------------


class NoiseProcess(ABC):
    """A teacher's forward process x_t = alpha(t)·x0 + sigma(t)·eps and its network conventions.

    t is the process's own time (VP: timestep index; EDM: sigma; flow: t in [0, 1]); t tensors are
    per sample, (B,) (or scalars). All methods work on any device and in float32/float64.
    """

    kind: str
    prediction_type: str
    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5
    #: The scheduler's bound on x0 predictions (VP schedulers with clip_sample / thresholding); none by default.
    x0_clip: X0Clip = X0Clip()
    #: Whether `denoise` returns its x0 bounded by ``x0_clip`` (a view made by `for_sampler`); never on the process
    #: itself, whose `denoise` trains students and builds targets.
    bounds_x0: bool = False

    def for_sampler(self) -> NoiseProcess:
        """This process as a student's sampler reads it: `denoise` bounds every x0 prediction with ``x0_clip``, as
        the teacher's diffusers scheduler bounds it in each ``step`` (LCMScheduler: the x0 prediction is clipped before
        its boundary scalings c_skip·x + c_out·x0; DDPM / DDIM: before the step to the next level). Samplers that build
        their step from this ``denoise`` (consistency functions, re-noising samplers, jumps x_s = (s/t) x + (1 − s/t) x0,
        ODE steps) then bound x0 exactly where the stock scheduler of their export does (docs/CONDITIONING.md §3).

        Returns the process itself when its scheduler bounds nothing (every EDM / flow process, VP without
        clip_sample / thresholding), so those samplers are unchanged bit for bit; else a shallow copy (the same
        tables) with ``bounds_x0`` set."""
        if not self.x0_clip.active or self.bounds_x0:
            return self
        view = copy.copy(self)
        view.bounds_x0 = True
        return view

    def _bounded(self, x0: Tensor) -> Tensor:
        return self.x0_clip(x0) if self.bounds_x0 else x0

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t), shaped like ``t``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t) of x_t (not the sigma-space level), shaped like ``t``."""

    @abstractmethod
    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma-space level sigma(t)/alpha(t) for process time ``t``."""

    @abstractmethod
    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Process time whose sigma-space level is ``sigma`` (> 0); inverse of `t_to_sigma`."""

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """The ``timestep`` tensor the backbone is fed at process time ``t``."""

    def c_in(self, t: Tensor) -> Tensor:
        """Scale applied to x_t before the network (1 unless the process preconditions its input)."""
        return torch.ones_like(_as_time(t))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t)·x0 + sigma(t)·eps. x0, eps: (B, C, H, W); t: (B,)."""
        t = _as_time(t).to(x0.device)
        return _bc(self.alpha(t), x0) * x0 + _bc(self.sigma(t), x0) * eps

    @abstractmethod
    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Clean prediction from the raw network output. out, x_t: (B, C, H, W); t: (B,)."""

    @abstractmethod
    def output_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The raw output that `x0_from_output` maps to ``x0`` (for students that predict x0)."""

    @abstractmethod
    def output_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target of the raw output for x_t = add_noise(x0, eps, t) (teacher pretraining)."""

    def loss_weight(self, t: Tensor) -> Tensor:
        """(B,) weight of the pretraining MSE on the raw output; 1 for every supported process."""
        return torch.ones_like(_as_time(t))

    @abstractmethod
    def sample_train_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` process times from the pretraining distribution, (n,) on the CPU."""

    @abstractmethod
    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Descending sigma-space grid of the teacher's usual sampler plus a final 0: (num_steps + 1,)."""

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """A diffusers scheduler config (with ``_class_name``) that `process_from_scheduler_config` reads back."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and model cards."""

    def denoise(
        self,
        net: Callable[..., Tensor],
        x: Tensor,
        sigma: Tensor | float,
        cond: Any = None,
        **scalars: Tensor,
    ) -> Tensor:
        """Sigma-space denoiser D(x, sigma) built from the teacher network.

        x = x0 + sigma·eps: (B, C, H, W); sigma: (B,) or scalar. The network is called as
        ``net(c_in(t)·x_t, model_time(t), cond, **scalars)`` with t = sigma_to_t(sigma) and
        x_t = alpha(t)·x, and its output is converted to an x0 prediction (B, C, H, W).
        """
        t = self.sigma_to_t(_per_sample(sigma, x))
        x_t = _bc(self.alpha(t), x) * x
        out = net(_bc(self.c_in(t), x) * x_t, self.model_time(t), cond, **scalars)
        return self._bounded(self.x0_from_output(out, x_t, t))

    def network_inputs(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """What the backbone is fed for the sigma-space point (x, sigma), as in `denoise`: the scaled
        input c_in(t)·alpha(t)·x (B, C, H, W) and its ``timestep`` model_time(t) (B,). For networks
        that read noisy samples without denoising them (discriminators on bottleneck features)."""
        t = self.sigma_to_t(_per_sample(sigma, x))
        return _bc(self.c_in(t) * self.alpha(t), x) * x, self.model_time(t)

    def _check_steps(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(
                f"{type(self).__name__}.sampling_sigmas: num_steps must be >= 1, got {num_steps}."
            )

    def _check_prediction_type(self, supported: tuple[str, ...]) -> None:
        if self.prediction_type not in supported:
            raise ValueError(
                f"{type(self).__name__}: prediction_type {self.prediction_type!r} is not supported; "
                f"use one of {supported}."
            )


def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Glide / iDDPM cosine schedule ("squaredcos_cap_v2"), as diffusers `betas_for_alpha_bar`."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=torch.float64
    )


class VPProcess(NoiseProcess):
    """Discrete variance-preserving (DDPM) process, as diffusers `DDPMScheduler` and friends.

    t is the timestep index in [0, N−1] as a float. alpha(t)² = alphas_cumprod[t] at integers; in
    between, the sigma-space level is interpolated linearly in log-sigma over the index, so
    fractional timesteps are continuous and strictly monotone (outside [0, N−1] the end segments are
    extrapolated). alpha² + sigma² = 1. The network is fed model_time(t) = t.

    Args (defaults are diffusers' DDPMScheduler defaults, i.e. DDPM's linear schedule):
        num_train_timesteps: N, number of discrete timesteps.
        beta_start, beta_end: end points of "linear" / "scaled_linear" schedules.
        beta_schedule: "linear", "scaled_linear" (linear in sqrt(beta), Stable Diffusion) or
            "squaredcos_cap_v2" (cosine, betas capped at 0.999).
        prediction_type: "epsilon", "v_prediction" (v = alpha·eps − sigma·x0) or "sample" (x0).
        trained_betas: explicit betas (length N); overrides the schedule.
        x0_clip: the scheduler's clip_sample / thresholding settings (:class:`X0Clip`); none by default.
            They do not change the process or `denoise`; the teacher's samplers and targets apply them
            (fewstep.teacher), students' samplers read `denoise` through `for_sampler`, and `scheduler_config`
            writes them.
    """

    kind = "vp"
    BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        trained_betas: list[float] | Tensor | None = None,
        x0_clip: X0Clip | None = None,
    ) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        self.x0_clip = x0_clip if x0_clip is not None else X0Clip()
        self.beta_start, self.beta_end, self.beta_schedule = float(beta_start), float(beta_end), beta_schedule
        self.prediction_type = prediction_type
        self._check_prediction_type(self.PREDICTION_TYPES)
        n = self.num_train_timesteps
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
            self.num_train_timesteps = n = betas.numel()
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ValueError(
                f"VPProcess: beta_schedule {beta_schedule!r} is not supported; use one of "
                f"{self.BETA_SCHEDULES} or pass trained_betas."
            )
        if n < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"VPProcess: need at least 2 timesteps with betas in (0, 1), got {n} timesteps, "
                f"betas in [{betas.min().item():.3g}, {betas.max().item():.3g}]; check the schedule."
            )
        self.trained_betas = betas.tolist() if trained_betas is not None else None
        #: (N,) float64 CPU, as diffusers' `alphas_cumprod` (computed in float64 here).
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ac = self.alphas_cumprod
        #: (N,) float64 CPU, ln(sigma-space level) = ½·ln((1 − ᾱ)/ᾱ); strictly increasing.
        self.log_sigmas = 0.5 * (torch.log1p(-ac) - torch.log(ac))
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.sigma_min = math.exp(self.log_sigmas[0].item())
        self.sigma_max = math.exp(self.log_sigmas[-1].item())

    def _table(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = self.log_sigmas.to(like.device, like.dtype)
        return self._tables[key]

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        table = self._table(t)
        i = t.detach().floor().clamp(0, self.num_train_timesteps - 2).long()
        lo, hi = table[i], table[i + 1]
        return torch.exp(lo + (t - i.to(t.dtype)) * (hi - lo))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        log_s = torch.log(_as_time(sigma))
        table = self._table(log_s)
        i = torch.searchsorted(table, log_s.detach().contiguous(), right=True) - 1
        i = i.clamp(0, self.num_train_timesteps - 2)
        lo, hi = table[i], table[i + 1]
        return i.to(log_s.dtype) + (log_s - lo) / (hi - lo)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.rsqrt(1 + self.t_to_sigma(t) ** 2)

    def sigma(self, t: Tensor) -> Tensor:
        s = self.t_to_sigma(t)
        return s * torch.rsqrt(1 + s**2)

    def model_time(self, t: Tensor) -> Tensor:
        return _as_time(t)

    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t = _as_time(t).to(x_t.device)
        return self._x0(out, x_t, _bc(self.alpha(t), x_t), _bc(self.sigma(t), x_t))

    def _x0(self, out: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * out  # v = a·eps − s·x0 and a² + s² = 1 (Salimans & Ho 2022, §4)
        return out

    def denoise(
        self,
        net: Callable[..., Tensor],
        x: Tensor,
        sigma: Tensor | float,
        cond: Any = None,
        **scalars: Tensor,
    ) -> Tensor:
        """`NoiseProcess.denoise` with one sigma->t conversion (for the timestep) instead of three round trips:
        alpha = 1/sqrt(1 + sigma²) and the VP sigma = sigma·alpha come from the given sigma-space level."""
        level = _per_sample(sigma, x)
        t = self.sigma_to_t(level)
        a = torch.rsqrt(1 + level**2)
        x_t = _bc(a, x) * x
        out = net(x_t, self.model_time(t), cond, **scalars)  # c_in = 1 for VP
        return self._bounded(self._x0(out, x_t, _bc(a, x_t), _bc(level * a, x_t)))

    def output_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t = _as_time(t).to(x_t.device)
        a, s = _bc(self.alpha(t), x_t), _bc(self.sigma(t), x_t)
        if self.prediction_type == "epsilon":
            return (x_t - a * x0) / s
        if self.prediction_type == "v_prediction":
            return (a * x_t - x0) / s
        return x0

    def output_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = _as_time(t).to(x0.device)
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return _bc(self.alpha(t), x0) * eps - _bc(self.sigma(t), x0) * x0
        return x0

    def sample_train_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in {0, …, N−1} (DDPM Alg. 1), as floats."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(
            torch.get_default_dtype()
        )

    def trailing_timesteps(self, num_steps: int) -> Tensor:
        """Integer timesteps of diffusers' DDIM ``timestep_spacing="trailing"``: (num_steps,) int64.

        t_i = round(N − i·N/num_steps) − 1 (Lin et al. 2023, Table 2), descending from N − 1.
        """
        self._check_steps(num_steps)
        n = self.num_train_timesteps
        return torch.tensor([round(n - i * n / num_steps) - 1 for i in range(num_steps)], dtype=torch.int64)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        t = self.trailing_timesteps(num_steps).to(torch.float64)
        return _grid(torch.cat([self.t_to_sigma(t), t.new_zeros(1)]))

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": self.trained_betas,
            "prediction_type": self.prediction_type,
            **self.x0_clip.config(),
        }

    def describe(self) -> str:
        if self.trained_betas is not None:
            betas = "trained betas"
        elif self.beta_schedule == "squaredcos_cap_v2":
            betas = "squaredcos_cap_v2 betas"
        else:
            betas = f"{self.beta_schedule} betas [{self.beta_start:g}, {self.beta_end:g}]"
        return (
            f"VP/DDPM process: {self.num_train_timesteps} timesteps, {betas}, prediction={self.prediction_type}, "
            f"sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
            + (f", {self.x0_clip.describe()}" if self.x0_clip.active else "")
        )


class EDMProcess(NoiseProcess):
    """EDM / variance-exploding process with EDM preconditioning (EDM Table 1), as diffusers'
    `EDMEulerScheduler`.

    t = sigma, alpha = 1. The network F is fed c_in·x with c_in = 1/√(sigma² + sd²) and timestep
    c_noise = ¼·ln(sigma); x0 = c_skip·x + c_out·F. For "v_prediction" c_out is negated (diffusers
    `precondition_outputs` convention). The EDM loss weight lambda = 1/c_out² on the x0 error equals
    weight 1 on the error of F, so `loss_weight` is 1.

    Args (defaults from EDM Table 1 / diffusers EDMEulerScheduler):
        sigma_min, sigma_max: 0.002 and 80, the sampling range.
        sigma_data: 0.5, data standard deviation.
        prediction_type: "epsilon" or "v_prediction".
        rho: 7, Karras grid exponent.
        timestep_scale: the network's timestep is timestep_scale·¼·ln(sigma): 1 as diffusers'
            EDMEulerScheduler; 1000 for networks made in the OpenAI consistency-models / CTM convention
            (consistency.md §1: they feed 1000·¼·ln sigma), whose consistency students diffusers'
            CMStochasticIterativeScheduler samples exactly. Stored as ``_fewstep_timestep_scale``.
    """

    kind = "edm"
    PREDICTION_TYPES = ("epsilon", "v_prediction")
    #: Training noise distribution ln sigma ~ N(P_MEAN, P_STD²), EDM Table 1.
    P_MEAN = -1.2
    P_STD = 1.2

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        timestep_scale: float = 1.0,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"EDMProcess: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        if timestep_scale <= 0:
            raise ValueError(f"EDMProcess: timestep_scale must be > 0, got {timestep_scale}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)
        self.timestep_scale = float(timestep_scale)
        self.prediction_type = prediction_type
        self._check_prediction_type(self.PREDICTION_TYPES)

    def _scalings(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _ = edm_scalings(_as_time(t).to(like.device), self.sigma_data)
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return _bc(c_skip, like), _bc(c_out, like)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _as_time(t)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return _as_time(t)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return _as_time(sigma)

    def model_time(self, t: Tensor) -> Tensor:
        # EDM Table 1 c_noise, as diffusers precondition_noise (times 1000 in the OpenAI convention)
        return self.timestep_scale * 0.25 * torch.log(_as_time(t))

    def c_in(self, t: Tensor) -> Tensor:
        return edm_scalings(_as_time(t), self.sigma_data)[2]

    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        c_skip, c_out = self._scalings(t, x_t)
        return c_skip * x_t + c_out * out  # EDM Eq. 7

    def output_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        c_skip, c_out = self._scalings(t, x_t)
        return (x0 - c_skip * x_t) / c_out  # EDM Eq. 8 effective target

    def output_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.output_from_x0(x0, self.add_noise(x0, eps, t), t)

    def sample_train_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Lognormal sigmas, ln sigma ~ N(−1.2, 1.2²) (EDM Table 1), not clipped to [sigma_min, sigma_max]."""
        return lognormal_sigmas(n, self.P_MEAN, self.P_STD, generator)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        self._check_steps(num_steps)
        grid = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
        return torch.cat([grid, grid.new_zeros(1)])

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "_class_name": "EDMEulerScheduler",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "sigma_schedule": "karras",
            "num_train_timesteps": 1000,
            "prediction_type": self.prediction_type,
            "rho": self.rho,
            "final_sigmas_type": "zero",
            **({"_fewstep_timestep_scale": self.timestep_scale} if self.timestep_scale != 1.0 else {}),
        }

    def describe(self) -> str:
        return (
            f"EDM process: sigma in [{self.sigma_min:g}, {self.sigma_max:g}], sigma_data={self.sigma_data:g}, "
            f"rho={self.rho:g}, prediction={self.prediction_type} (EDM-preconditioned"
            + (f", timestep {self.timestep_scale:g}·¼·ln sigma)" if self.timestep_scale != 1.0 else ")")
        )


class FlowProcess(NoiseProcess):
    """Rectified-flow process, as diffusers' `FlowMatchEulerDiscreteScheduler` (SD3, Flux-style).

    x_t = (1 − t)·x0 + t·eps with t in [0, 1]; the network predicts the velocity eps − x0 and is fed
    model_time = t·N. The sigma-space level is t/(1 − t). The time shift is t' = shift·t/(1 + (shift − 1)·t)
    (SD3 Eq. 23).

    Args:
        num_train_timesteps: N (diffusers default 1000).
        shift: time shift (1 = none; SD3 uses 3).
        t_max: largest t used, so that sigma_max = t_max/(1 − t_max) is finite. Default 1 − 1/N, the
            largest non-terminal training time of the discrete scheduler.
        time_distribution: pretraining time density, "logit_normal" (SD3 §3.1, m = 0, s = 1) or "uniform";
            both are then shifted.
    """

    kind = "flow"
    TIME_DISTRIBUTIONS = ("logit_normal", "uniform")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        t_max: float | None = None,
        time_distribution: str = "logit_normal",
    ) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        if self.num_train_timesteps < 2 or shift <= 0:
            raise ValueError(
                f"FlowProcess: need num_train_timesteps >= 2 and shift > 0, got "
                f"{num_train_timesteps} and {shift}."
            )
        self.shift = float(shift)
        self._default_t_max = t_max is None
        self.t_max = 1.0 - 1.0 / self.num_train_timesteps if t_max is None else float(t_max)
        self.t_min = self._shift(1.0 / self.num_train_timesteps)
        if not self.t_min < self.t_max < 1.0:
            raise ValueError(
                f"FlowProcess: t_max must lie in ({self.t_min:g}, 1), got {self.t_max}; "
                "leave it unset for 1 − 1/num_train_timesteps."
            )
        if time_distribution not in self.TIME_DISTRIBUTIONS:
            raise ValueError(
                f"FlowProcess: time_distribution {time_distribution!r} is not supported; "
                f"use one of {self.TIME_DISTRIBUTIONS}."
            )
        self.time_distribution = time_distribution
        self.prediction_type = "flow"
        self.sigma_min = self.t_min / (1.0 - self.t_min)
        self.sigma_max = self.t_max / (1.0 - self.t_max)

    def _shift(self, t: Any) -> Any:
        return self.shift * t / (1 + (self.shift - 1) * t)  # SD3 Eq. 23

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - _as_time(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _as_time(t)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return t / (1 - t)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        sigma = _as_time(sigma)
        return sigma / (1 + sigma)

    def model_time(self, t: Tensor) -> Tensor:
        return _as_time(t) * self.num_train_timesteps

    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return x_t - _bc(_as_time(t).to(x_t.device), x_t) * out  # x_t = x0 + t·(eps − x0)

    def output_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return (x_t - x0) / _bc(_as_time(t).to(x_t.device), x_t)

    def output_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def sample_train_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Logit-normal(0, 1) or uniform t, shifted, clamped to [t_min, t_max] so sigma stays finite."""
        if self.time_distribution == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        return _grid(self._shift(u).clamp(self.t_min, self.t_max))

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """diffusers FlowMatchEuler `set_timesteps` grid in sigma space, with t = 1 lowered to t_max.

        As diffusers: t = shift(linspace(1, t_min, num_steps)) where t_min = shift(1/N) is itself
        already shifted (so the smallest level is shifted twice, exactly as diffusers does). Levels
        above t_max (only the first one unless num_steps is close to N) are clamped to t_max.
        """
        self._check_steps(num_steps)
        t = self._shift(torch.linspace(1.0, self.t_min, num_steps, dtype=torch.float64)).clamp(max=self.t_max)
        return _grid(torch.cat([t / (1 - t), t.new_zeros(1)]))

    def scheduler_config(self) -> dict[str, Any]:
        cfg_dict: dict[str, Any] = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift,
            "use_dynamic_shifting": False,
            # Underscore keys are ignored by diffusers' ConfigMixin; they keep fewstep's own choices.
            "_fewstep_time_distribution": self.time_distribution,
        }
        if not self._default_t_max:
            cfg_dict["_fewstep_t_max"] = self.t_max
        return cfg_dict

    def describe(self) -> str:
        return (
            f"flow-matching process: {self.num_train_timesteps} timesteps, shift={self.shift:g}, "
            f"t in [{self.t_min:.4g}, {self.t_max:.4g}] (sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}]), "
            f"velocity prediction, {self.time_distribution} training times"
        )


# ---------------------------------------------------------------------------------------------
# diffusers scheduler configs
# ---------------------------------------------------------------------------------------------

_VP_CLASSES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
)
_EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)

# (beta_start, beta_end, beta_schedule) defaults of the diffusers classes that differ from DDPM's.
_VP_DEFAULTS = {
    "LCMScheduler": (0.00085, 0.012, "scaled_linear"),
    "TCDScheduler": (0.00085, 0.012, "scaled_linear"),
    "HeunDiscreteScheduler": (0.00085, 0.012, "linear"),
}

# Options that change the process itself (not just the inference grid) and are not modelled here,
# with the only accepted value. Grid-only options (timestep_spacing, use_karras_sigmas, ...) are
# ignored: `sampling_sigmas` always uses the grid documented on each process.
_UNSUPPORTED_OPTIONS = {
    "vp": {"rescale_betas_zero_snr": False, "timestep_type": "discrete", "use_flow_sigmas": False},
    "edm": {},
    "flow": {"use_dynamic_shifting": False, "invert_sigmas": False},
}


def _reject_options(name: str, kind: str, cfg_dict: dict[str, Any]) -> None:
    for key, accepted in _UNSUPPORTED_OPTIONS[kind].items():
        value = cfg_dict.get(key)
        if value is not None and value != accepted:
            raise ValueError(
                f"process_from_scheduler_config: {name} option {key}={value!r} is not supported "
                f"(only {key}={accepted!r}); remove it from the scheduler config or pick a teacher without it."
            )


# Schedulers whose clip_sample defaults to True in diffusers (0.42.1): a config without the key clips. The other
# VP classes default to False or have no such key.
_CLIP_BY_DEFAULT = ("DDPMScheduler", "DDIMScheduler")


def _x0_clip(name: str, cfg_dict: dict[str, Any]) -> X0Clip:
    """The scheduler's x0 bound; missing keys take the diffusers class's defaults."""
    default = X0Clip()
    return X0Clip(
        clip_sample=bool(cfg_dict.get("clip_sample", name in _CLIP_BY_DEFAULT)),
        clip_sample_range=float(cfg_dict.get("clip_sample_range", default.clip_sample_range)),
        thresholding=bool(cfg_dict.get("thresholding", False)),
        dynamic_thresholding_ratio=float(cfg_dict.get("dynamic_thresholding_ratio",
                                                      default.dynamic_thresholding_ratio)),
        sample_max_value=float(cfg_dict.get("sample_max_value", default.sample_max_value)),
    )


def _build_process(name: str, kind: str, cfg_dict: dict[str, Any]) -> NoiseProcess:
    if kind == "vp":
        start, end, schedule = _VP_DEFAULTS.get(name, (0.0001, 0.02, "linear"))
        return VPProcess(
            num_train_timesteps=cfg_dict.get("num_train_timesteps", 1000),
            beta_start=cfg_dict.get("beta_start", start),
            beta_end=cfg_dict.get("beta_end", end),
            beta_schedule=cfg_dict.get("beta_schedule", schedule),
            prediction_type=cfg_dict.get("prediction_type", "epsilon"),
            trained_betas=cfg_dict.get("trained_betas"),
            x0_clip=_x0_clip(name, cfg_dict),
        )
    if kind == "edm":
        return EDMProcess(
            sigma_min=cfg_dict.get("sigma_min", 0.002),
            sigma_max=cfg_dict.get("sigma_max", 80.0),
            sigma_data=cfg_dict.get("sigma_data", 0.5),
            prediction_type=cfg_dict.get("prediction_type", "epsilon"),
            rho=cfg_dict.get("rho", 7.0),
            timestep_scale=cfg_dict.get("_fewstep_timestep_scale", 1.0),
        )
    return FlowProcess(
        num_train_timesteps=cfg_dict.get("num_train_timesteps", 1000),
        shift=cfg_dict.get("shift", 1.0),
        t_max=cfg_dict.get("_fewstep_t_max"),
        time_distribution=cfg_dict.get("_fewstep_time_distribution", "logit_normal"),
    )


def process_from_scheduler_config(cfg: dict[str, Any]) -> NoiseProcess:
    """Build the `NoiseProcess` of a diffusers scheduler config (``scheduler_config.json`` contents).

    VP for the DDPM-family schedulers, EDM for the EDM schedulers and flow for
    FlowMatchEulerDiscreteScheduler. Missing keys take that diffusers class's defaults; irrelevant
    keys are ignored; options that would change the process and are not modelled raise ValueError.
    """
    name = cfg.get("_class_name")
    kinds = {**dict.fromkeys(_VP_CLASSES, "vp"), **dict.fromkeys(_EDM_CLASSES, "edm")}
    kinds.update(dict.fromkeys(_FLOW_CLASSES, "flow"))
    if name not in kinds:
        raise ValueError(
            f"process_from_scheduler_config: unknown scheduler class {name!r} (the config's '_class_name'). "
            f"Supported: VP {list(_VP_CLASSES)}, EDM {list(_EDM_CLASSES)}, flow {list(_FLOW_CLASSES)}."
        )
    _reject_options(name, kinds[name], cfg)
    try:
        return _build_process(name, kinds[name], cfg)
    except ValueError as err:
        raise ValueError(f"process_from_scheduler_config: {name} config: {err}") from err


# ---------------------------------------------------------------------------------------------
# TrigFlow (sCM: Lu & Song 2024; consistency.md §6.1)
# ---------------------------------------------------------------------------------------------
#
# TrigFlow: x_t = cos(t)·x0 + sin(t)·z with z ~ N(0, sd² I) and t in [0, π/2] (sd = sigma_data).
# Dividing by cos t gives sigma space: x = x_t / cos t = x0 + sigma·(z / sd) with sigma = sd·tan t,
# so every sigma-space denoiser D(x, sigma) above is a TrigFlow model and vice versa (§6.1: the
# EDM scalings become c_skip = cos t, c_out = −sd·sin t, c_in = 1/sd). The PF-ODE velocity is
# dx_t/dt = sd·F(x_t/sd, t) and the consistency function of sCM is the DDIM step to t = 0,
# f(x_t, t) = cos t·x_t − sin t·sd·F = D(x_t / cos t, sd·tan t). t: (B,) or a scalar.

__all__ += [
    "trigflow_add_noise",
    "trigflow_denoise",
    "trigflow_from_sigma_space",
    "trigflow_scalings",
    "trigflow_sigma_from_t",
    "trigflow_t_from_sigma",
    "trigflow_to_sigma_space",
    "trigflow_velocity",
]


def trigflow_t_from_sigma(sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """TrigFlow time of the sigma-space level: t = arctan(sigma / sd) in [0, π/2) (§6.1, Alg. 1 l. 2)."""
    return torch.atan(_as_time(sigma) / sigma_data)


def trigflow_sigma_from_t(t: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """Sigma-space level of TrigFlow time t: sigma = sd·tan t (EDM equivalence, §6.1)."""
    return sigma_data * torch.tan(_as_time(t))


def trigflow_to_sigma_space(x_t: Tensor, t: Tensor | float) -> Tensor:
    """x = x_t / cos t, so x = x0 + sigma·eps with sigma = sd·tan t. x_t: (B, C, H, W)."""
    return x_t / _bc(torch.cos(_per_sample(t, x_t)), x_t)


def trigflow_from_sigma_space(x: Tensor, t: Tensor | float) -> Tensor:
    """x_t = cos t·x for a sigma-space x at sigma = sd·tan t. x: (B, C, H, W)."""
    return x * _bc(torch.cos(_per_sample(t, x)), x)


def trigflow_add_noise(x0: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
    """x_t = cos t·x0 + sin t·z; z ~ N(0, sd² I) has the data's scale (§6.1). x0, z: (B, C, H, W)."""
    t = _per_sample(t, x0)
    return _bc(torch.cos(t), x0) * x0 + _bc(torch.sin(t), x0) * z


def trigflow_scalings(t: Tensor | float, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """TrigFlow's c_skip, c_out, c_in = cos t, −sd·sin t, 1/sd, shaped like ``t`` (§6.1).

    D = c_skip·x_t + c_out·F(c_in·x_t, t) is the x0 prediction of the TrigFlow network F; in sigma
    space this is EDM's preconditioning at sigma = sd·tan t with F_trig = −F_edm (`edm_scalings`).
    """
    t = _as_time(t)
    return torch.cos(t), -sigma_data * torch.sin(t), torch.full_like(t, 1.0 / sigma_data)


def trigflow_velocity(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """PF-ODE velocity dx_t/dt = sd·F implied by an x0 prediction: (cos t·x_t − x0) / sin t.

    From f = cos t·x_t − sin t·sd·F = x0 (§6.1). Exact for x0 = D(x_t / cos t, sd·tan t); for the
    true x0 of x_t = cos t·x0 + sin t·z it is the conditional velocity cos t·z − sin t·x0 (sCT's
    estimate, §6.2). Divides by sin t: keep t away from 0 (a clamp at the teacher's smallest level).
    """
    t = _per_sample(t, x_t)
    return (_bc(torch.cos(t), x_t) * x_t - x0) / _bc(torch.sin(t), x_t)


def trigflow_denoise(denoise_fn: DenoiseFn, x_t: Tensor, t: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """The x0 prediction at TrigFlow point (x_t, t) of a sigma-space denoiser: D(x_t / cos t, sd·tan t).

    This is sCM's consistency function f(x_t, t) for a network whose own time embedding is kept
    (the paper's c_noise(t) = t needs a teacher trained in TrigFlow). Differentiable in x_t and t
    (forward and backward mode), through the teacher's time mapping. Divides by cos t: keep t below
    π/2 (a clamp at the teacher's largest level).
    """
    t = _per_sample(t, x_t)
    return denoise_fn(trigflow_to_sigma_space(x_t, t), trigflow_sigma_from_t(t, sigma_data))


# ---------------------------------------------------------------------------------------------
# Conditioning of a student's x0 at the top levels (docs/CONDITIONING.md; applied by fewstep.backbones)
# ---------------------------------------------------------------------------------------------

__all__ += ["AUTO_CAP_SIGMA", "MAX_X0_GAIN", "cap_timestep", "student_sigma_cap", "x0_gain"]

#: The largest top-level x0 error gain (docs/CONDITIONING.md) that ``student_sigma_cap: auto`` leaves uncapped: 15,
#: just above Stable Diffusion 1.x/2.x's scaled-linear schedule at t = 999 (14.6), the most distilled epsilon
#: teacher (LCM trains there); DDPM's linear betas (157) are above it and get capped at :data:`AUTO_CAP_SIGMA`.
MAX_X0_GAIN = 15.0

#: Where ``auto`` caps such a teacher's students: sigma 2 (x0 gain 2; t = 395 on DDPM's linear betas), the level of
#: DMD2 SDXL's one-step timestep 399 and of recipes/fashion/dmd2.yaml's generator. Measured on the stock DDPM
#: Fashion teacher (docs/BENCHMARKS.md, issue 14 round 7; teacher DDIM-50 FID 76.53): capped at 15 (gain 15) one-step
#: students failed (FID: CD 194.75, SCT 411.68, KD 203.46, DMD 1039); capped at 2, CD 68.57, SCT 72.44, KD 91.98,
#: and DMD2 86.24 -> 72.42.
AUTO_CAP_SIGMA = 2.0


def x0_gain(process: Any, sigma: float) -> float:
    """How much the x0 prediction at sigma-space level ``sigma`` moves per unit change of the network's output,
    |d x0 / d out| (docs/CONDITIONING.md). VP: epsilon s/a = sigma, v-prediction s = sigma/sqrt(1 + sigma^2),
    sample 1; EDM: |c_out| = sigma sd/sqrt(sigma^2 + sd^2) (< sd); flow (x0 = x_t - t v): t = sigma/(1 + sigma)."""
    if process.kind == "vp":
        return {"epsilon": sigma, "v_prediction": sigma / (1 + sigma**2) ** 0.5}.get(process.prediction_type, 1.0)
    if process.kind == "edm":
        sd = process.sigma_data
        return sigma * sd / (sigma**2 + sd**2) ** 0.5
    return sigma / (1 + sigma)


def student_sigma_cap(process: Any, setting: float | str = "auto") -> float | None:
    """The sigma-space level at which a student copied from a teacher with ``process`` is capped, or None.

    setting: "auto" caps an epsilon-prediction VP teacher whose top level has an x0 gain above
    :data:`MAX_X0_GAIN` (DDPM's linear betas: 157) at sigma = :data:`AUTO_CAP_SIGMA` (2), and nothing else (v / x0
    prediction, EDM and flow teachers are well conditioned: gains below 1, sigma_data and 1); "none": no cap; a
    number: cap there (VP teachers only, inside their levels)."""
    if setting == "none":
        return None
    if setting == "auto":
        if process.kind != "vp" or process.prediction_type != "epsilon":
            return None
        return AUTO_CAP_SIGMA if x0_gain(process, process.sigma_max) > MAX_X0_GAIN else None
    sigma = float(setting)
    if process.kind != "vp":
        raise ValueError(f"student_sigma_cap={sigma:g}: a capped input level is implemented for VP teachers only, "
                         f"this one is {process.describe()}; use 'auto' or 'none'")
    if not process.sigma_min < sigma < process.sigma_max:
        raise ValueError(f"student_sigma_cap={sigma:g} must lie inside the teacher's levels "
                         f"({process.sigma_min:.4g}, {process.sigma_max:.4g}); use 'none' for no cap")
    return sigma


def cap_timestep(process: Any, sigma: float) -> float:
    """The integer VP timestep floor(t(sigma)) at which a student capped at ``sigma`` is read, so stock discrete
    schedulers can evaluate it (floored with a tolerance: a level read back from a saved cap is its own timestep
    up to rounding)."""
    return float(torch.floor(process.sigma_to_t(torch.tensor([float(sigma)], dtype=torch.float64)) + 1e-6))
