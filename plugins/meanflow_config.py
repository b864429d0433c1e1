"""Configs of the ``meanflow`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.meanflow` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.hookspecs import hookimpl
from fewstep.method_configs import TangentOptions, check_flow_sample_times


class MeanFlowConfig(TangentOptions):
    """MeanFlow (arXiv 2505.13447); defaults: the official CIFAR-10 settings (module docstring)."""

    name: Literal["meanflow"] = "meanflow"
    velocity: Literal["teacher", "data"] = Field(
        "teacher", description="teacher: v is the (guided) teacher's flow velocity (distillation); data: v = eps − x0, "
        "the conditional flow-matching velocity (the paper: training without a teacher).")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: start from the teacher's weights; "
                                               "random: from scratch, as in the paper.")
    ratio: float = Field(0.75, ge=0.0, le=1.0, description="Fraction of samples with r != t; the rest take r = t "
                         "(plain flow matching). Official CIFAR-10: 0.75; paper ImageNet: 0.25 [UNVERIFIED].")
    p_mean_t: float = Field(-0.6, description="Logit-normal mean of t (official CIFAR-10: -0.6).")
    p_std_t: float = Field(1.6, gt=0, description="Logit-normal std of t (official CIFAR-10: 1.6).")
    p_mean_r: float = Field(-4.0, description="Logit-normal mean of r before sorting (official CIFAR-10: -4.0).")
    p_std_r: float = Field(1.6, gt=0, description="Logit-normal std of r (official CIFAR-10: 1.6).")
    adaptive_p: float = Field(0.75, ge=0.0, description="p of the adaptive weight 1/(||Δ||² + c)^p (official "
                              "CIFAR-10: 0.75; paper ImageNet: 1.0 [UNVERIFIED]); 0: plain squared L2.")
    adaptive_c: float = Field(1e-3, gt=0, description="c of the adaptive weight (official: 1e-3).")
    tangent_norm: Literal["normalize", "clip", "none"] = Field(
        "none", description="none: MeanFlow's raw target (the paper); normalize / clip: the sCM / AYF tangent "
        "normalisation of (u_tgt − u⁻), an ablation that turns the target into AYF-EMD's.")
    sample_times: dict[int, list[float]] = Field(
        {}, description="Flow times t_0 > ... > t_N of the N-step sampler, per N (N + 1 values, usually ending in 0); "
        "default: the teacher's own N-step grid in flow time (1 step: t_max -> 0, MeanFlow's z_1 -> z_0).")
    clamp: bool = Field(True, description="Clamp the final pixel sample to [-1, 1]; never latents.")

    @model_validator(mode="after")
    def _check(self) -> MeanFlowConfig:
        check_flow_sample_times(self.sample_times)
        return self


@hookimpl
def fewstep_method_config():
    return ("meanflow", MeanFlowConfig)


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if cfg.name == "meanflow" and cfg.velocity == "data" and config.teacher.guidance != 1.0:
        raise ValueError(f"teacher.guidance={config.teacher.guidance} with method.velocity: data would be ignored (the "
                         "target uses eps − x0 and never the teacher); set teacher.guidance: 1.0, or velocity: teacher "
                         "to distil the guided teacher")
