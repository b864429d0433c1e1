"""Consistency-training pieces shared by ECT / SCT (``plugins/ect.py``) and TCM (``plugins/tcm.py``):
ECT's shrinking-gap curriculum r(t), truncated time distributions, the adaptive (pseudo-Huber) loss and its
1/(t − r) weighting, and ECT's multistep sampling levels. Maths: specs/consistency.md §4; TCM facts from the
official code (NVlabs/TCM ``training/loss.py``, ``misc.truncated_t``).

Everything is in sigma space (``fewstep.diffusion``): t and r are noise levels of x = x0 + sigma·eps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.diffusion import karras_sigmas

__all__ = ["adaptive_loss", "ect_r", "ect_sample_levels", "ect_stage", "inverse_gap_weight", "truncated_lognormal",
           "truncated_log_student_t"]


def ect_stage(nimg: int, stage_nimg: int) -> int:
    """Stage index a = floor(images seen / stage length) (ECT ``update_schedule``: a = tick // double)."""
    return nimg // stage_nimg


def ect_r(t: Tensor, stage: int, mapping: str = "sigmoid", q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's r(t) (consistency.md §4.3): r = max(0, t (1 - q^-(a+1) n(t))), with n(t) = 1 + k sigmoid(-b t)
    ("sigmoid") or n = 1 ("const"). t: (B,) sigma-space levels; 0 <= r <= t, and r -> t as a grows."""
    n = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else torch.ones_like(t)
    return t * (1 - q ** -(stage + 1) * n).clamp_min(0)


def truncated_lognormal(n: int, p_mean: float, p_std: float, lo: float, hi: float,
                        generator: torch.Generator | None = None) -> Tensor:
    """(n,) levels with ln t ~ N(p_mean, p_std^2) conditioned on lo <= t <= hi (inverse-CDF draw)."""
    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((math.log(x) - p_mean) / (p_std * math.sqrt(2))))

    c_lo, c_hi = cdf(lo), cdf(hi)
    u = c_lo + (c_hi - c_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = torch.exp(p_mean + p_std * math.sqrt(2) * torch.erfinv(2 * u - 1))
    return t.clamp(lo, hi).to(torch.get_default_dtype())


def adaptive_loss(delta: Tensor, c: float) -> Tensor:
    """sqrt(|delta|^2 + c^2) - c per sample, the norm over the whole sample (ECT §4.4), evaluated as
    |delta|^2 / (sqrt(|delta|^2 + c^2) + c), which does not cancel in float32 when |delta| << c. c = 0 is
    the L2 norm, computed with ``vector_norm`` so that an exact zero difference has gradient 0, not NaN."""
    flat = delta.flatten(1).float()
    if c == 0:
        return torch.linalg.vector_norm(flat, dim=1)
    sq = flat.square().sum(1)
    return sq / (torch.sqrt(sq + c * c) + c)


def truncated_log_student_t(n: int, p_mean: float, p_std: float, df: float, lo: float, hi: float,
                            generator: torch.Generator | None = None) -> Tensor:
    """(n,) levels with (ln t − p_mean)/p_std ~ Student-t(df) conditioned on lo <= t <= hi (TCM's stage-2
    proposal: heavy tails spread t over [t', T] where a log-normal would concentrate it; TCM CIFAR-10 and
    ImageNet: p_mean 0, p_std 0.2, df 0.01 [CODE: NVlabs/TCM README]). Inverse-CDF draw with scipy's Student-t
    (scipy comes with scikit-learn; torch has no Student-t CDF), uniforms from ``generator``."""
    from scipy.stats import t as student_t

    c_lo, c_hi = student_t.cdf([(math.log(lo) - p_mean) / p_std, (math.log(hi) - p_mean) / p_std], df)
    u = c_lo + (c_hi - c_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    z = torch.from_numpy(student_t.ppf(u.numpy(), df))
    return torch.exp(p_mean + p_std * z).clamp(lo, hi).to(torch.get_default_dtype())


def inverse_gap_weight(t: Tensor, r: Tensor) -> Tensor:
    """ECT's and TCM's default weighting 1/(t − r) (ECT CIFAR-10 ``main``; TCM ``weighting: default``). A
    pair drawn exactly at its floor (t = r) has online == target and gets weight 0 instead of 0/0."""
    dt = t - r
    return torch.where(dt > 0, 1 / dt.clamp_min(torch.finfo(dt.dtype).tiny), torch.zeros_like(dt))


def ect_sample_levels(num_steps: int, t_mid: float, sigma_min: float, sigma_max: float) -> list[float]:
    """Levels of ECT's N-step sampler (§4.6): [sigma_max] + the first N − 1 points of an N-point Karras grid
    from t_mid down to sigma_min (N = 2: [sigma_max, t_mid])."""
    if num_steps > 1 and not sigma_min < t_mid < sigma_max:
        raise ValueError(f"method.t_mid={t_mid} must lie in (sigma_min, sigma_max) = ({sigma_min:g}, "
                         f"{sigma_max:g}); change t_mid or give method.sample_sigmas[{num_steps}]")
    return [sigma_max, *karras_sigmas(num_steps, sigma_min, t_mid)[:-1].tolist()]
