"""Configs of the ``lowdiff`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.lowdiff` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.method_configs import check_resolutions


class LowDiffConfig(MethodConfig):
    name: Literal["lowdiff"] = "lowdiff"
    resolutions: list[int] | None = Field(
        None, min_length=1, description="Model-space sizes of the cascade, lowest first, each a multiple of the "
        "one before, the last the data's (latent) size; none: [R/4, R/2, R] (this implementation's default, "
        "unverified: the paper's cascades could not be read).")
    stage_probs: list[float] | None = Field(
        None, description="Probability of training each stage (one per resolution); none: uniform (unverified).")
    upsampling: Literal["nearest", "bilinear"] = Field(
        "nearest", description="Up-sampling of the condition to the stage's size (nearest: unverified choice).")
    cond_noise: float = Field(0.1, ge=0.0, description="Std of the Gaussian noise added to the condition in "
                              "training and sampling, data units (conditioning augmentation of Cascaded Diffusion "
                              "Models; 0.1 is this implementation's value, unverified for LowDiff).")
    p_uncond: float = Field(0.1, ge=0.0, lt=1.0, description="Condition dropout for classifier-free guidance (as "
                            "the diffusion plugin; CFG paper: 0.1-0.2); only used by conditional teachers.")
    solver: Literal["euler", "ddim", "heun"] = Field("heun", description="ODE solver of every stage (EDM: Heun).")
    step_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Stage k samples with round(N * step_ratio^k) "
                              "steps (at least 1) for N steps at the lowest stage (unverified split).")
    stage_steps: dict[int, list[int]] = Field(
        default_factory=dict, description="Explicit steps per stage (lowest first) for a step count N, e.g. "
        "{16: [16, 4, 2]}; overrides step_ratio for that N.")
    start_sigma: float | None = Field(
        None, gt=0.0, description="Stages above the lowest start from the up-sampled previous output noised to "
        "this sigma-space level instead of from pure noise (SDEdit-style; unverified); none: pure noise.")
    base_student: Path | None = Field(
        None, description="Export folder of a student distilled from this model's base_teacher/ (any method): "
        "sampled at its own N-step sampler for the lowest stage instead of the ODE (the same as stage_students[0]).")
    stage_students: dict[int, Path] = Field(
        default_factory=dict, description="Stage index k -> export folder of a student distilled (any method) from "
        "this model's base_teacher/ (k = 0) or stage_teachers/<k>/: stage k is sampled by that student's own "
        "sampler at the stage's step count, fed the previous stage's up-sampled output as its condition image.")


@hookimpl
def fewstep_method_config():
    return ("lowdiff", LowDiffConfig)


@hookimpl
def fewstep_configure(config) -> None:
    method = config.method
    if method.name != "lowdiff":
        return
    if config.teacher.pretrained is None:
        raise ValueError("method 'lowdiff' fine-tunes a teacher into the unified model: set teacher.pretrained "
                         "(e.g. an export of the `diffusion` method)")
    if method.resolutions is not None:
        check_resolutions(method.resolutions)
        if method.stage_probs is not None and len(method.stage_probs) != len(method.resolutions):
            raise ValueError(f"method.stage_probs has {len(method.stage_probs)} entries for "
                             f"{len(method.resolutions)} resolutions; give one probability per stage")
    if method.base_student is not None and 0 in method.stage_students:
        raise ValueError("method.base_student and method.stage_students[0] both name a student of the lowest stage; "
                         "give one of them")
    if min(method.stage_students, default=0) < 0 or (
            method.resolutions is not None and max(method.stage_students, default=0) >= len(method.resolutions)):
        raise ValueError(f"method.stage_students has stages {sorted(method.stage_students)}; stages are numbered 0 "
                         f"(lowest resolution) to {len(method.resolutions or [0, 0, 0]) - 1}")
    if method.stage_probs is not None and (min(method.stage_probs) < 0 or sum(method.stage_probs) <= 0):
        raise ValueError(f"method.stage_probs {method.stage_probs}: give non-negative weights with a positive sum")
