"""Configs of the ``tcm`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.tcm` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class TCMConfig(MethodConfig):
    """TCM; defaults are the official CIFAR-10 settings (module docstring)."""

    name: Literal["tcm"] = "tcm"
    stage1_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of train.total_nimg spent in stage 1 "
                                   "(TCM README: equal iteration counts for both stages).")
    sigma_min: float | None = Field(None, gt=0, description="Boundary level; none: the teacher's smallest level.")
    sigma_max: float | None = Field(None, gt=0, description="Largest level; none: TCM's T = 80, capped at the "
                                    "teacher's largest level.")
    p_mean: float = Field(-1.1, description="Stage 1: log-normal mean of t (TCM CIFAR-10: -1.1).")
    p_std: float = Field(2.0, gt=0, description="Stage 1: log-normal std of t (TCM CIFAR-10: 2.0).")
    transition_sigma: float = Field(1.0, gt=0, description="t', the truncation level in sigma space (TCM: 1).")
    p_mean_truncated: float = Field(0.0, description="Stage 2: location of ln t, log-Student-t (TCM: 0).")
    p_std_truncated: float = Field(0.2, gt=0, description="Stage 2: scale of ln t (TCM: 0.2).")
    student_df: float = Field(0.01, gt=0, description="Stage 2: degrees of freedom of the Student-t (TCM: 0.01).")
    boundary_prob: float = Field(0.25, gt=0.0, lt=1.0, description="Stage 2: share of samples at t = t' (TCM: 0.25).")
    boundary_weight: float = Field(0.1, ge=0.0, description="Stage 2: weight of the boundary mean against the "
                                   "truncated mean (TCM: 0.1).")
    stage2_lr_scale: float = Field(0.5, gt=0.0, description="Stage 2: factor on optimizer.lr (TCM CIFAR-10: 5e-5 "
                                   "after stage 1's 1e-4, so 0.5; 1 keeps stage 1's rate).")
    q: float = Field(2.0, gt=1, description="ECT's Δt shrink factor per curriculum stage (TCM CIFAR-10: 2).")
    k: float = Field(8.0, ge=0, description="k of ECT's sigmoid mapping (TCM: 8).")
    b: float = Field(1.0, gt=0, description="b of ECT's sigmoid mapping (TCM: 1).")
    stage_nimg: int = Field(12_800_000, gt=0, description="Images per Δt-halving stage (TCM CIFAR-10: 25k "
                            "iterations at batch 512); the count runs on through stage 2, as the official resume does.")
    ratio_limit: float = Field(0.999, gt=0.0, lt=1.0, description="Cap of 1 − q^-(a+1), the shrink of Δt (TCM: 0.999).")
    huber_c: float = Field(0.0, ge=0, description="c of sqrt(|d|² + c²) − c over the whole sample; 0: the L2 norm "
                           "(TCM CIFAR-10 passes 1e-8).")
    t_mid: float = Field(0.821, gt=0, description="Second level of the multistep sampler (ECT / TCM: 0.821).")
    sample_sigmas: dict[int, list[float]] = Field({}, description="Levels of the N-step sampler, per N; default "
                                                  "[sigma_max] + the first N-1 points of a Karras grid from t_mid.")
    clamp: bool = Field(True, description="Clamp pixel samples to [-1, 1] after each step; never latents.")

    def run_length_use(self) -> str | None:
        return f"stage 1 ends at stage1_fraction={self.stage1_fraction} of train.total_nimg"


@hookimpl
def fewstep_method_config():
    return ("tcm", TCMConfig)
