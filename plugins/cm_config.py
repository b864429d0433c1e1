"""Configs of the ``cd``, ``ct`` and ``ict`` methods and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.cm` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class _Consistency(MethodConfig):
    sigma_min: float | None = Field(None, gt=0, description="Boundary level epsilon in sigma space; none: the "
                                    "teacher's smallest level (EDM teachers: 0.002, CM §1).")
    sigma_max: float | None = Field(None, gt=0, description="Largest level; none: the teacher's (EDM: 80).")
    sigma_data: float | None = Field(None, gt=0, description="sigma_d of the boundary scalings; none: the "
                                     "teacher process's (0.5 for data in [-1, 1], CM §1).")
    rho: float = Field(7.0, gt=0, description="Karras grid exponent (CM §1).")
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("l2", description="Distance d of the loss; LPIPS is not "
                                                          "offered (its VGG weights are a download).")
    huber_c: float | None = Field(None, gt=0, description="Pseudo-Huber c; none: 0.00054 * sqrt(D) (iCT).")
    sample_sigmas: dict[int, list[float]] = Field(
        {}, description="Levels tau_1 > ... > tau_N of the N-step sampler, per N; default: N points of the grid "
        "trained on (fewstep.sampling.grid_levels: every (M // N)-th of its M points from sigma_max; CD: its grid, "
        "CT/iCT: the final curriculum grid), as CM picks them from its grid (by FID search, §2.7).")
    clamp: bool = Field(True, description="Clamp pixel outputs to [-1, 1] after each sampler step (CM sampler); "
                        "never applied to latents.")
    self_condition: bool = Field(False, description="Self-conditioned student (Analog Bits, distribution.md §6): "
                                 "it also reads an x0 estimate (zero-initialised extra channels); in training half "
                                 "the batch gets a no-grad first-pass estimate, online and target alike; the "
                                 "multistep sampler feeds each step the previous step's output. A self-conditioned "
                                 "teacher's student is self-conditioned anyway.")


class CDConfig(_Consistency):
    """Consistency distillation (CM §2.3); LCM-style with ``grid: teacher``, ``boundary: lcm``, ``guidance``."""

    name: Literal["cd"] = "cd"
    num_scales: int = Field(18, ge=2, description="N of the Karras training grid (CM CIFAR-10 CD: 18).")
    solver: Literal["euler", "heun", "ddim"] = Field("heun", description="Teacher ODE step (CM: Heun for every CD "
                                                     "run; DDIM equals Euler in sigma space, as LCM uses).")
    substeps: int = Field(1, ge=1, description="Teacher solver steps per grid interval, at Karras-interpolated "
                          "levels (with a Karras grid, k substeps on N points solve on the k(N-1)+1-point grid). "
                          "CM: 1. A fewstep addition: CD's student converges to the teacher's solve along its grid, "
                          "and on a coarse grid one Heun step overshoots (speckles) and one Euler step blurs.")
    target_ema: float = Field(0.0, ge=0.0, lt=1.0, description="Target-network EMA mu; 0: stop-gradient of the "
                              "student (CM CIFAR-10 JAX config); ImageNet-64 used 0.95.")
    grid: Literal["karras", "teacher"] = Field("karras", description="karras: N-point Karras grid; teacher: the "
                                               "teacher's discrete timesteps every `skip` steps (LCM, VP only).")
    skip: int = Field(20, ge=1, description="LCM skipping-step k on the 1000-step schedule (LCM: 20).")
    boundary: Literal["cm", "lcm"] = Field("cm", description="cm: sigma_min-shifted EDM scalings (exact boundary); "
                                           "lcm: LCM's scalings with timestep*10 (VP only).")
    guidance: tuple[float, float] | None = Field(
        None, description="LCM-style guided distillation: w ~ U[lo, hi] per sample, the teacher step uses CFG with "
        "w and the student takes w as an extra input (zero-initialised). Range is [UNVERIFIED] (LCM paper "
        "[2, 14], diffusers script [5, 15]); needs a conditional teacher.")
    sample_guidance: float = Field(4.0, ge=0.0, description="w given to a guided student when sampling.")

    @model_validator(mode="after")
    def _check(self) -> CDConfig:
        if self.guidance is not None and not (0 <= self.guidance[0] <= self.guidance[1]):
            raise ValueError(f"guidance must be (lo, hi) with 0 <= lo <= hi, got {self.guidance}")
        return self


class CTConfig(_Consistency):
    """Consistency training (CM §2.4-2.5): no teacher network in the loss, an adaptive target EMA."""

    name: Literal["ct"] = "ct"
    s0: int = Field(2, ge=1, description="Initial discretisation (CM CIFAR-10: 2).")
    s1: int = Field(150, ge=2, description="Final discretisation (CM CIFAR-10: 150).")
    mu0: float = Field(0.9, gt=0.0, lt=1.0, description="Initial target EMA (CM CIFAR-10: 0.9).")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: start from the teacher's weights (as "
                                               "the official ImageNet CT commands do); random: from scratch.")

    def run_length_use(self) -> str | None:
        return "its discretisation curriculum N(k) and target EMA mu(k) follow images seen / train.total_nimg"


class ICTConfig(_Consistency):
    """Improved consistency training (iCT, consistency.md §3): stop-gradient target, lognormal pair
    distribution, exponential curriculum, pseudo-Huber loss with 1/(sigma_hi - sigma_lo) weighting."""

    name: Literal["ict"] = "ict"
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("pseudo_huber", description="iCT: pseudo-Huber.")
    s0: int = Field(10, ge=1, description="Initial discretisation (iCT: 10).")
    s1: int = Field(1280, ge=2, description="Final discretisation (iCT: 1280).")
    p_mean: float = Field(-1.1, description="Lognormal mean of the pair distribution (iCT: -1.1).")
    p_std: float = Field(2.0, gt=0, description="Lognormal std (iCT: 2.0).")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: start from the teacher's "
                                               "weights; random: from scratch as in the paper.")

    def run_length_use(self) -> str | None:
        return "its discretisation curriculum N(k) follows images seen / train.total_nimg"


@hookimpl
def fewstep_method_config():
    return [("cd", CDConfig), ("ct", CTConfig), ("ict", ICTConfig)]
