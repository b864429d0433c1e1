"""Configs of the ``flowmap`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.flowmap` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.hookspecs import hookimpl
from fewstep.method_configs import TangentOptions, check_flow_sample_times, check_sample_guidance


class FlowMapConfig(TangentOptions):
    """AYF-EMD / AYF-LMD (§9.2-9.5)."""

    name: Literal["flowmap"] = "flowmap"
    objective: Literal["emd", "lmd"] = Field("emd", description="emd: Eulerian map distillation (§9.2, the paper's "
                                             "choice); lmd: Lagrangian (§9.3; over-smoothed images in the paper).")
    time_sampling: Literal["sorted", "gap"] = Field(
        "sorted", description="(t, s), s < t [UNVERIFIED, §9.4, both from unofficial reimplementations]: sorted: two "
        "logit-normal times, sorted; gap: d = sigmoid(N(P_mean, P_std²)), s ~ U(0, 1 − d), t = s + d. Both clamped "
        "to the teacher's range. On Gaussian toy data (tests/test_flowmap.py) sorted trained maps that beat the "
        "init at 1, 4 and 8 steps; gap (0, 1) trained too few short gaps and its 8-step chain got worse.")
    p_mean: float = Field(0.0, description="Logit-normal mean of the proposal [UNVERIFIED: our choice].")
    p_std: float = Field(1.0, gt=0, description="Logit-normal std of the proposal [UNVERIFIED: our choice].")
    endpoint_share: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of pairs whose s is the data end (s = 0, t from the proposal's t): "
        "consistency-model pairs, the maps a 1-step sampler chains to (our extension, not in the paper; 0: the "
        "proposal alone).")
    warmup_nimg: int = Field(5_120_000, ge=0, description="Tangent warm-up in images: r = r_max·min(1, nimg/H) "
                             "[UNVERIFIED length: sCM's 10k iterations at batch 512]; 0: r = r_max at once.")
    r_max: float = Field(0.99, ge=0.0, le=1.0, description="Final warm-up factor (§9.2: 0.99, never 1; the r < 1 part "
                         "acts as a flow-matching regulariser).")
    guidance: tuple[float, float] | None = Field(
        None, description="lambda ~ U[lo, hi] per sample: the teacher velocity is guided with lambda (autoguidance "
        "when teacher.autoguidance is set, §9.5, else CFG) and the student takes lambda as an input "
        "([UNVERIFIED] range; one reimplementation uses U[1, 3]). None: teacher.guidance, fixed, no student input.")
    sample_guidance: float | dict[int, float] | None = Field(
        None, description="lambda of a guided student when sampling: one scale, or one per step count ({1: 2.5, 4: "
        "1.5}); none (or a step count the dict lacks): the middle of the guidance range.")
    sample_times: dict[int, list[float]] = Field(
        {}, description="Flow times t_0 > ... > t_N of the N-step sampler, per N (N + 1 values, usually ending in 0); "
        "default: the teacher's own N-step grid (VP: DDIM trailing) in flow time.")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="gamma-sampling (CTM-style, §9.7): jump to the level "
                         "sqrt(1 − gamma²)·sigma_next, then add noise back up to sigma_next; 0: deterministic chaining.")
    clamp: bool = Field(True, description="Clamp the final pixel sample to [-1, 1]; never latents.")

    @model_validator(mode="after")
    def _check(self) -> FlowMapConfig:
        if self.guidance is not None and not 0 <= self.guidance[0] <= self.guidance[1]:
            raise ValueError(f"method.guidance must be (lo, hi) with 0 <= lo <= hi, got {self.guidance}")
        check_flow_sample_times(self.sample_times)
        check_sample_guidance(self.sample_guidance)
        return self


@hookimpl
def fewstep_method_config():
    return ("flowmap", FlowMapConfig)
