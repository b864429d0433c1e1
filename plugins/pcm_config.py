"""Configs of the ``pcm`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.pcm` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class PCMConfig(MethodConfig):
    """PCM; defaults are the official SD1.5 settings where they apply (module docstring)."""

    name: Literal["pcm"] = "pcm"
    num_phases: int = Field(4, ge=1, description="K, the number of phases (official SD1.5 recipes: 1, 2, 4, 8; "
                            "the K-step sampler takes one step per phase).")
    solver_steps: int = Field(50, ge=2, description="N, points of the teacher's solver grid (PCM: 50 DDIM steps).")
    guidance: tuple[float, float] | None = Field(
        None, description="CFG scale of the teacher step drawn from U[lo, hi] per sample (PCM SD1.5: w in [4, 5], "
        "scale 1 + w); none: the fixed teacher.guidance (1.0: CFG-free training, PCM's not_apply_cfg_solver).")
    target_ema: float = Field(0.0, ge=0.0, lt=1.0, description="EMA rate of the target network; 0: the stop-gradient "
                              "student (the official LoRA scripts).")
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("pseudo_huber", description="d of the consistency loss "
                                                          "(PCM: pseudo-Huber, elementwise; here over the sample).")
    huber_c: float | None = Field(None, gt=0, description="Pseudo-Huber c; none: 0.00054·sqrt(D) (iCT).")
    adv_weight: float | None = Field(None, ge=0, description="Weight of the adversarial consistency loss (PCM: 0.1); "
                                     "none: no discriminator.")
    disc_lr: float = Field(1e-5, gt=0, description="Discriminator learning rate (PCM: adv_lr 1e-5).")
    disc_every_n_steps: int = Field(1, ge=1, description="The discriminator steps every k trainer steps.")
    sample_sigmas: dict[int, list[float]] = Field(
        {}, description="Sigma-space levels sigma_0 > ... > sigma_N of the N-step sampler, per N (N + 1 values, "
        "ending in 0); default: the phase edges (module docstring).")
    clamp: bool = Field(True, description="Clamp the final pixel sample to [-1, 1]; never latents.")

    @model_validator(mode="after")
    def _check(self) -> PCMConfig:
        if self.num_phases > self.solver_steps:
            raise ValueError(f"method.num_phases={self.num_phases} exceeds solver_steps={self.solver_steps}: every "
                             "phase needs at least one solver interval")
        if self.guidance is not None and not 0 <= self.guidance[0] <= self.guidance[1]:
            raise ValueError(f"method.guidance must be (lo, hi) with 0 <= lo <= hi, got {self.guidance}")
        for n, levels in self.sample_sigmas.items():
            if len(levels) != n + 1 or levels[-1] != 0 or any(b >= a for a, b in zip(levels, levels[1:])):
                raise ValueError(f"method.sample_sigmas[{n}]: need {n + 1} decreasing levels ending in 0, got {levels}")
        return self


@hookimpl
def fewstep_method_config():
    return ("pcm", PCMConfig)
