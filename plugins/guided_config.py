"""Configs of the ``guided`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.guided` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.data_config import run_teacher_info
from fewstep.hookspecs import hookimpl


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class GuidedConfig(MethodConfig):
    """Guided distillation: stage 1 (w-conditioned student) then PD halvings down to ``final_steps``."""

    name: Literal["guided"] = "guided"
    w_min: float = Field(0.0, ge=0.0, description="Smallest guidance weight w (Meng: x_w = (1+w) x_c - w x_u; "
                         "fewstep scale g = 1 + w), drawn per sample, U[w_min, w_max]. 0: Meng et al.'s pixel "
                         "range [0, 4] [R: recollection, unverified].")
    w_max: float = Field(4.0, ge=0.0, description="Largest guidance weight w; 4: Meng et al. pixel models [R].")
    sample_w: float = Field(1.0, ge=0.0, description="w given to the student when sampling (validation, eval, "
                            "export); must lie in [w_min, w_max]. 1.0 is a fewstep choice, not a paper value.")
    stage1_nimg: int = Field(20000, gt=0, description="Images of stage 1 (phase distill-w); a fewstep default "
                             "sized for 16x16 benchmarks (the paper's length is not verified).")
    round_nimg: int = Field(20000, gt=0, description="Images of each halving round; a fewstep default (PD "
                            "ImageNet-64: 50k steps of batch 2048 per round, §4.3 [C]).")
    start_steps: int = Field(64, ge=1, description="Steps N of the stage-1 model's DDIM sampler that the first "
                             "round distils into N/2; a power of two (PD ImageNet-64 starts at 1024, §4.3 [C]; "
                             "64 keeps 16x16 runs short).")
    final_steps: int = Field(1, ge=1, description="Steps of the final student (halving stops there); a power "
                             "of two <= start_steps; start_steps itself means stage 1 only.")
    sigma_min: float | None = Field(None, gt=0, description="Smallest nonzero level of the nested grid; none: "
                                    "the teacher's.")
    sigma_max: float | None = Field(None, gt=0, description="Largest level of the nested grid (sampling "
                                    "starts there); none: the teacher's.")
    rho: float = Field(7.0, gt=0, description="Karras exponent of the nested grid (EDM Eq. 5: 7).")
    weighting: Literal["snr_trunc", "x"] = Field("snr_trunc", description="snr_trunc: per sample "
                                                 "max(mean dx^2, mean deps^2) = max(1, SNR) mean dx^2, PD's "
                                                 "truncated-SNR weighting (§4.3 [C]); x: plain x0 MSE.")
    sampler: Literal["ddim", "stochastic"] = Field("ddim", description="ddim: deterministic N-step DDIM; "
                                                   "stochastic: Meng's two-steps-forward, one-step-back sampler "
                                                   "(§4.4; boundary handling is fewstep's, see stochastic_sample).")
    clip: bool = Field(True, description="Clip the x0 prediction to [-1, 1] at every sampling step (PD clips "
                       "only at sampling, §4.3 [C]); never applied to latents.")
    anneal_lr: bool = Field(True, description="Anneal the learning rate linearly to 0 within each halving round "
                            "(PD ImageNet-64, §4.3 [C]); stage 1 keeps it constant.")
    keep_steps: list[int] | None = Field(None, description="Step counts whose round model is kept (frozen extra "
                                         "networks steps_N, exported with the student), so one run samples at "
                                         "each of them with the model distilled for it (PD makes one model per "
                                         "step count); entries must be intermediate rounds of this run. None: "
                                         "2 and 4 where they are.")

    @model_validator(mode="after")
    def _check(self) -> GuidedConfig:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min={self.w_min} > w_max={self.w_max}; give w_min <= w_max")
        if not self.w_min <= self.sample_w <= self.w_max:
            raise ValueError(f"sample_w={self.sample_w} lies outside [w_min, w_max] = [{self.w_min}, {self.w_max}]: "
                             "the student is never trained there; pick a sample_w inside the range")
        for field in ("start_steps", "final_steps"):
            if not _is_power_of_two(getattr(self, field)):
                raise ValueError(f"{field}={getattr(self, field)} must be a power of two (each round halves the "
                                 "steps on a nested grid)")
        if self.final_steps > self.start_steps:
            raise ValueError(f"final_steps={self.final_steps} > start_steps={self.start_steps}; halving only "
                             "reduces the number of steps")
        rounds = set(round_steps(self)[:-1])
        if bad := [k for k in self.keep_steps or () if k not in rounds]:
            raise ValueError(f"keep_steps={self.keep_steps}: {bad} are not intermediate rounds of this run "
                             f"({sorted(rounds) or 'none'}; the final student is kept anyway)")
        return self


def round_steps(cfg: GuidedConfig) -> list[int]:
    """Student steps of the halving rounds, in order: start_steps/2, start_steps/4, ..., final_steps."""
    return [cfg.start_steps >> k for k in range(1, int(math.log2(cfg.start_steps // cfg.final_steps)) + 1)]


def require_guidable(source, conditioning: str, autoguided: bool) -> None:
    """Refuse an unconditional teacher without a weaker checkpoint: guidance has nothing to contrast. Checked
    from the teacher folder's configs before anything is built (``fewstep_configure``) and on the loaded
    teacher (``fewstep_build_student``)."""
    if conditioning == "none" and not autoguided:
        raise ValueError(f"method 'guided' distils a guided teacher, but the teacher at {source} is "
                         "unconditional, so classifier-free guidance has no unconditional branch to contrast. "
                         "Set teacher.pretrained to a class- or text-conditional teacher trained with condition "
                         "dropout (e.g. one made by recipes/digits/teacher-class.yaml), or give a weaker "
                         "checkpoint as teacher.autoguidance")


@hookimpl
def fewstep_method_config():
    return ("guided", GuidedConfig)


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if not isinstance(cfg, GuidedConfig):
        return
    needed = cfg.stage1_nimg + len(round_steps(cfg)) * cfg.round_nimg
    if config.train.total_nimg < needed:
        raise ValueError(f"train.total_nimg={config.train.total_nimg} is shorter than method.stage1_nimg + "
                         f"{len(round_steps(cfg))} rounds x method.round_nimg = {needed}: the last halving rounds "
                         f"would never run; raise train.total_nimg to {needed} or shorten the stages")
    for where, steps in (("validation.steps", config.validation.steps), ("export.steps", [config.export.steps])):
        for k in steps:
            if not _is_power_of_two(k) or k > cfg.start_steps:
                raise ValueError(f"{where}: {k} steps is not on guided's nested grid; use powers of two <= "
                                 f"method.start_steps={cfg.start_steps}")
    if (info := run_teacher_info(config)) is not None:  # from the folder's JSON configs
        require_guidable(config.teacher.pretrained, info.conditioning, config.teacher.autoguidance is not None)
