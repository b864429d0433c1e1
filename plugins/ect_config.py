"""Configs of the ``ect`` and ``sct`` methods and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.ect` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class ECTConfig(MethodConfig):
    """Easy Consistency Tuning (consistency.md §4); defaults are ECT's CIFAR-10 `main` settings."""

    name: Literal["ect"] = "ect"
    p_mean: float = Field(-1.1, description="Lognormal mean of t (ECT CIFAR-10: -1.1; ImageNet presets -0.8).")
    p_std: float = Field(2.0, gt=0, description="Lognormal std of t (ECT CIFAR-10: 2.0; ImageNet presets 1.6).")
    sigma_min: float | None = Field(None, gt=0, description="Boundary level; none: the teacher's smallest "
                                    "sigma-space level (EDM 0.002, the digits VP teacher 0.01).")
    sigma_max: float | None = Field(None, gt=0, description="Largest level, for training and the first sampler "
                                    "step; none: ECT's T = 80, capped at the teacher's largest level.")
    mapping: Literal["sigmoid", "const"] = Field("sigmoid", description="r(t): sigmoid (ECT default) "
                                                 "r = t(1 - q^-(a+1) (1 + k sigmoid(-b t))); const r = t(1 - q^-(a+1)).")
    q: float = Field(2.0, gt=1, description="Delta-t shrink factor per stage (ECT CIFAR-10: 2; ImageNet: 4).")
    k: float = Field(8.0, ge=0, description="k of the sigmoid mapping (ECT: 8).")
    b: float = Field(1.0, gt=0, description="b of the sigmoid mapping, per unit sigma (ECT: 1).")
    stage_nimg: int = Field(3_200_000, gt=0, description="Images per stage a (ECT CIFAR-10: 250 ticks of "
                            "12.8 kimg = 3.2 Mimg, 8 stages in 25.6 Mimg; ImageNet: 3.2 Mimg, 4 stages).")
    weighting: Literal["inv_dt", "snr_k"] = Field("inv_dt", description="inv_dt: 1/(t - r) (ECT CIFAR-10 "
                                                  "`main`); snr_k: 1/t^2 + 1/sigma_d^2, no 1/dt (ECT ImageNet).")
    huber_c: float = Field(0.0, ge=0, description="Pseudo-Huber c of sqrt(|d|^2 + c^2) - c over the whole "
                           "sample; 0: the unsquared L2 norm (ECT CIFAR-10); ECT ImageNet: 0.06 (0.00054 sqrt(D)).")
    dropout: float | None = Field(None, ge=0, lt=1, description="Student dropout probability, shared by the "
                                  "online and target passes; none: the teacher's (ECT CIFAR-10: 0.2).")
    t_mid: float = Field(0.821, gt=0, description="Re-noising level of the 2-step sampler x + t_mid z "
                         "(ECT CIFAR-10 default 0.821, said to come from iCT [UNVERIFIED]; ImageNet-64: 1.526).")
    sample_sigmas: dict[int, list[float]] = Field(
        {}, description="Levels of the N-step sampler, per N, overriding the default [sigma_max] followed by "
        "the first N-1 points of an N-point Karras grid from t_mid down to sigma_min (N = 2: [sigma_max, t_mid]).")
    clamp: bool = Field(True, description="Clamp pixel samples to [-1, 1] after each step (the CM sampler's "
                        "rule); never applied to latents.")


class SCTConfig(ECTConfig):
    """Stable Consistency Tuning (consistency.md §5): ECT plus a variance-reduced target, phased
    training with an edge-skipping sampler, and guidance by an earlier EMA snapshot. The Delta-t
    schedule is ECT's r(t): §5.3's smoother schedule is [UNVERIFIED] and not reproduced."""

    name: Literal["sct"] = "sct"  # type: ignore[assignment]
    stable_target: bool = Field(True, description="Use the score-identity target of §5.2 (off: plain ECT).")
    reference_size: int | None = Field(None, ge=1, description="Reference set of the stable target: blocks of "
                                       "this many consecutive samples of the global batch; none: the whole "
                                       "per-process micro-batch (loss hooks do not all-gather, so the target "
                                       "then depends on the per-process batch). A divisor of the per-process "
                                       "batch makes runs independent of the number of processes.")
    segment_edges: list[float] = Field([], description="Inner segment edges s_1 < ... < s_{M-1} (sigma space) "
                                       "of phased SCT (§5.4); empty: one segment, as ECT. Edges are a "
                                       "[REVIEW]-level idea borrowed from PCM; pick them like PCM's phases.")
    eta: float = Field(0.0, ge=0, lt=1, description="Edge skipping (§5.5, [UNVERIFIED] formula): each phased "
                       "step lands eta of the next segment's length below its edge; 0: exactly on the edges.")
    guidance_snapshot: float | None = Field(None, gt=0, lt=1, description="Fraction of training at which the "
                                            "evaluation EMA is copied into the `snapshot` network that guides "
                                            "sampling (§5.6: the paper tries 0.25, 0.5, 0.75); none: no snapshot.")
    guidance: float = Field(1.0, ge=0, description="w of f_snapshot + w (f - f_snapshot) when sampling; 1: "
                            "unguided (2 network evaluations per step otherwise).")

    def run_length_use(self) -> str | None:
        if self.guidance_snapshot is None:
            return None
        return f"its guidance snapshot is taken at guidance_snapshot={self.guidance_snapshot} of train.total_nimg"

    @model_validator(mode="after")
    def _check(self) -> SCTConfig:
        edges = self.segment_edges
        if any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"segment_edges must be strictly increasing, got {edges}")
        if self.guidance != 1.0 and self.guidance_snapshot is None:
            raise ValueError(f"guidance={self.guidance} needs a weak model: set guidance_snapshot (e.g. 0.5), "
                             "or guidance: 1.0 for unguided sampling")
        return self


@hookimpl
def fewstep_method_config():
    return [("ect", ECTConfig), ("sct", SCTConfig)]
