"""Flow maps and average velocities in rectified-flow time, for any teacher: the pieces shared by
Align Your Flow (``plugins/flowmap.py``, consistency.md §9) and MeanFlow (``plugins/meanflow.py``).

Time convention: a sigma-space point (x, sigma) of any teacher is the flow point x_t = x/(1 + sigma) at
t = sigma/(1 + sigma) in [0, 1), so x_t = (1 − t)·x0 + t·eps for VP, EDM and flow teachers alike; the
velocity of a sigma-space denoiser D there is v = (x_t − D(x_t/(1 − t), t/(1 − t)))/t. A (t, s) network
(the teacher's backbone with the extra scalar input ``s``, ``Backbone.add_scalar_inputs``) read the same
way is an average velocity F(x_t, t, s), and the Euler parameterisation f(x_t, t, s) = x_t + (s − t)·F
(AYF §9.1; MeanFlow's z_r = z_t − (t − r)·u) gives f(x, t, t) = x exactly. Flow time is bounded and its
velocity is O(1) everywhere, so one set of constants means the same thing at every noise level.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.diffusion import FlowProcess, append_dims
from fewstep.jvp import window_steps
from fewstep.types import Batch, Cond

__all__ = ["FLOW", "average_velocity", "chain", "default_sample_times", "fd_steps", "flow_map", "s_input",
           "teacher_velocity", "time_range", "velocity"]

FLOW = FlowProcess()  # only its sigma <-> flow-time conversions are used: t = sigma/(1 + sigma), alpha = 1 − t


def time_range(process) -> tuple[float, float]:
    """The teacher's levels [sigma_min, sigma_max] in flow time."""
    return process.sigma_min / (1 + process.sigma_min), process.sigma_max / (1 + process.sigma_max)


def s_input(process, s: Tensor) -> Tensor:
    """The student's ``s`` input: model time of flow time s's level, clamped at the teacher's sigma_min
    (so that s = 0 has an embedding)."""
    return process.model_time(process.sigma_to_t(FLOW.t_to_sigma(s).clamp(min=process.sigma_min)))


def velocity(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
    """Flow velocity (x_t − D(x_t/(1 − t), t/(1 − t)))/t of a sigma-space denoiser. x: (B, C, H, W); t: (B,)."""
    x0 = denoise(x / append_dims(FLOW.alpha(t), x.ndim), FLOW.t_to_sigma(t))
    return (x - x0) / append_dims(t, x.ndim)


def average_velocity(net, process, x: Tensor, t: Tensor, s: Tensor, cond: Cond | None, **scalars: Tensor) -> Tensor:
    """F(x_t, t, s) of a (t, s) student: its denoiser read as a flow velocity, with s as an input."""
    return velocity(lambda x_, sigma: process.denoise(net, x_, sigma, cond, s=s_input(process, s), **scalars), x, t)


def teacher_velocity(teacher, batch: Batch, guidance: float | Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """v(x_t, t): the teacher's flow velocity for ``batch``'s condition, guided with scale ``guidance``
    (float or (B,); CFG, or autoguidance when the teacher has a weaker checkpoint)."""
    def v(x: Tensor, t: Tensor) -> Tensor:
        return velocity(lambda x_, sigma: teacher.denoise(x_, sigma, batch.cond, uncond=batch.uncond,
                                                          guidance=guidance).float(), x, t)

    return v


def flow_map(F: Tensor, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """Euler parameterisation f = x_t + (s − t)·F (AYF §9.1)."""
    return x + append_dims(s - t, x.ndim) * F


def fd_steps(mode: str, process, time_map: Callable[[Tensor], Tensor], t: Tensor, window: float) -> Tensor | float:
    """Finite-difference steps of :func:`fewstep.jvp.jvp` along the time t: for a VP teacher, moving its timestep
    input (``time_map(t)``) by ±window DDPM timesteps (``window_steps``); for EDM and flow teachers (continuous
    time, no oscillation to average out) the float step 1e-3. Unused by the exact mode."""
    if mode != "finite_difference" or process.kind != "vp":
        return 1e-3
    return window_steps(time_map, t, window)


def default_sample_times(process, num_steps: int) -> list[float]:
    """The teacher's own N-step grid (``sampling_sigmas``) in flow time, ending at 0."""
    sigmas = process.sampling_sigmas(num_steps).double()
    return (sigmas / (1 + sigmas)).tolist()


@torch.no_grad()
def chain(F_fn, noise: Tensor, times: list[float], gamma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Flow-map sampling (§9.7): x_0 = t_0·noise, x_{i+1} = f(x_i, t_i, t_{i+1}) with f = x + (s − t)·F_fn(x, t, s).

    With gamma > 0 every step but the last lands at the level sqrt(1 − gamma²)·sigma_{i+1} and fresh noise
    brings it back up to sigma_{i+1} (CTM's gamma-sampling in sigma space). noise: (B, C, H, W) unit normal."""
    x = times[0] * noise
    batch = noise.shape[0]
    for i, (t, s) in enumerate(zip(times, times[1:])):
        renoise = gamma > 0 and i < len(times) - 2
        sigma_next = s / (1 - s)
        target = math.sqrt(1 - gamma**2) * sigma_next if renoise else sigma_next
        s_jump = target / (1 + target)
        tt, ss = (torch.full((batch,), v, device=noise.device, dtype=noise.dtype) for v in (t, s_jump))
        x = flow_map(F_fn(x, tt, ss), x, tt, ss)
        if renoise:
            z = torch.randn(noise.shape, generator=generator).to(noise.device)
            x_sigma = x * (1 + target) + gamma * sigma_next * z  # sqrt(sigma_next² − target²) = gamma·sigma_next
            x = x_sigma / (1 + sigma_next)
    return x
