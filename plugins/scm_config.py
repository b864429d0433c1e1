"""Configs of the ``scm`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.scm` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from fewstep.hookspecs import hookimpl
from fewstep.method_configs import TangentOptions, check_sample_guidance


class SCMConfig(TangentOptions):
    """sCT / sCD, paper Algorithm 1 (§6.2). Defaults are the CIFAR-10 settings of §6.4."""

    name: Literal["scm"] = "scm"
    mode: Literal["sct", "scd"] = Field("scd", description="sct: velocity estimate cos t·z − sin t·x0 from the data; "
                                        "scd: the teacher's PF-ODE velocity (§6.2).")
    p_mean: float = Field(-1.0, description="Proposal ln(sd·tan t) ~ N(P_mean, P_std²) (CIFAR-10 and ImageNet-64: -1.0).")
    p_std: float = Field(1.4, gt=0, description="Proposal std (CIFAR-10: 1.4; ImageNet-64: 1.6; §6.4).")
    sigma_data: float | None = Field(None, gt=0, description="sd of TrigFlow; none: the teacher process's (0.5).")
    sigma_min: float | None = Field(None, gt=0, description="Smallest training level (clamp of t from below); none: "
                                    "the teacher's smallest level.")
    sigma_max: float = Field(80.0, gt=0, description="Largest level: t_max = arctan(sigma_max/sd) clamps training "
                             "times and starts the sampler (paper: arctan(80/sd) = 1.5645); capped at the teacher's.")
    warmup_nimg: int = Field(5_120_000, ge=0, description="Tangent warm-up H in images, r = min(1, nimg/H) (paper: 10k "
                             "iterations, 5.12M images at CIFAR-10's batch 512); 0: r = 1 from the start.")
    adaptive_weight: bool = Field(True, description="Learn w_phi(t): loss e^w/D ||.||² − w (paper); false: ||.||²/D.")
    weight_channels: int = Field(128, ge=1, description="Fourier features of w_phi (EDM2's logvar head: 128, [UNVERIFIED]).")
    guidance: tuple[float, float] | None = Field(
        None, description="sCD only: w ~ U[lo, hi] per sample, the teacher velocity uses guidance w (CFG, or "
        "autoguidance with teacher.autoguidance) and the student takes w as an extra input (ImageNet-512 sCD: "
        "U[1, 2]). None: teacher.guidance, fixed, with no student input.")
    sample_guidance: float | dict[int, float] | None = Field(
        None, description="w of a guided student when sampling: one scale, or one per step count ({1: 2.5, 4: 1.5}); "
        "none (or a step count the dict lacks): the middle of the guidance range.")
    mid_t: float = Field(1.1, gt=0, lt=math.pi / 2, description="Intermediate time of the 2-step sampler (paper: 1.1); "
                         "N steps use t_max then N-1 times spaced evenly from mid_t towards 0 (our extension).")
    sample_times: dict[int, list[float]] = Field({}, description="TrigFlow times t_1 > ... > t_N of the N-step sampler, "
                                                 "per N, overriding the default above.")
    clamp: bool = Field(True, description="Clamp pixel x0 estimates to [-1, 1] in the sampler; never latents.")

    @model_validator(mode="after")
    def _check(self) -> SCMConfig:
        if self.guidance is not None:
            if self.mode != "scd":
                raise ValueError("method.guidance: only sCD has a teacher to guide; remove it or set mode: scd")
            if not 0 <= self.guidance[0] <= self.guidance[1]:
                raise ValueError(f"method.guidance must be (lo, hi) with 0 <= lo <= hi, got {self.guidance}")
        check_sample_guidance(self.sample_guidance)
        for n, times in self.sample_times.items():
            if len(times) != n or any(not 0 < b < a < math.pi / 2 for a, b in zip(times, times[1:])):
                raise ValueError(f"method.sample_times[{n}]: need {n} decreasing times in (0, π/2), got {times}")
        return self


@hookimpl
def fewstep_method_config():
    return ("scm", SCMConfig)
