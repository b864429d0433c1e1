"""Configs of the ``ctm`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.ctm` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class CTMConfig(MethodConfig):
    """CTM: (t, s)-conditioned student, soft consistency matching + DSM (+ GAN phase), gamma-sampling."""

    name: Literal["ctm"] = "ctm"
    sigma_min: float | None = Field(None, gt=0, description="epsilon, the level G maps to; none: the teacher's "
                                    "smallest level (EDM teachers: 0.002, §1).")
    sigma_max: float | None = Field(None, gt=0, description="Largest level; none: the teacher's (EDM: 80).")
    sigma_data: float | None = Field(None, gt=0, description="sigma_d of the DSM weight; none: the teacher "
                                     "process's (0.5 for data in [-1, 1]).")
    rho: float = Field(7.0, gt=0, description="Karras grid exponent (§1).")
    num_scales: int = Field(18, ge=3, description="N of the Karras training grid (CTM CIFAR-10: 18, ImageNet-64: 40).")
    num_heun_steps_max: int = Field(4, ge=1, description="K_max: the teacher solve takes k ~ P(k) ∝ k in "
                                    "{1..K_max} Heun steps, 2k teacher evaluations (CTM: N - 1, i.e. 17 on "
                                    "CIFAR-10; 4 here keeps a CPU step affordable).")
    target_ema: float = Field(0.999, ge=0.0, lt=1.0, description="mu of the target network theta^- (§7.6: "
                              "0.999, fixed); 0 makes theta^- the stop-gradient of the student.")
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("l2", description="d of the CTM loss (CTM: LPIPS, not "
                                                          "offered: its VGG weights are a download).")
    huber_c: float | None = Field(None, gt=0, description="Pseudo-Huber c; none: 0.00054 * sqrt(D) (iCT).")
    dsm_weight: float | None = Field(None, ge=0.0, description="lambda_DSM; none: adaptive, the gradient-norm "
                                     "ratio of the CTM and DSM losses at the output layer (§7.6).")
    dsm_weight_clip: tuple[float, float] = Field((0.0, 1e4), description="Bounds of the adaptive lambda_DSM: "
                                                 "VQGAN's [0, 1e4] ([UNVERIFIED] for CTM; §7.6 only states "
                                                 "the GAN clip).")
    dsm_p_mean: float = Field(-1.2, description="Lognormal half of the DSM noise law: mean of ln sigma (§7.4).")
    dsm_p_std: float = Field(1.2, gt=0, description="Lognormal half: std of ln sigma (§7.4).")
    dsm_karras_fraction: float = Field(0.7, gt=0, le=1, description="Karras half: u ~ U[0, this] of the "
                                       "rho-schedule from sigma_max, its high-noise part (§7.4 diffusion_mult).")
    gan_start_nimg: int | None = Field(None, gt=0, description="Images of the `ctm` phase (CTM + DSM) before the "
                                       "`gan` phase adds the GAN term and trains the discriminator to the end; "
                                       "none: no GAN phase, no discriminator (§7.5: GAN only in fine-tuning).")
    gan_loss: Literal["hinge", "nonsaturating"] = Field("hinge", description="GAN loss (CTM: hinge, §7.5).")
    gan_weight: float | None = Field(None, ge=0.0, description="lambda_GAN; none: adaptive gradient-norm ratio "
                                     "against the CTM loss, clipped to [0.01, 10] (§7.6).")
    gan_sigma_max: float | None = Field(None, gt=0, description="Diffusion-GAN noise: real and fake samples are "
                                        "noised to independent sigmas on the continuous Karras schedule from "
                                        "sigma_min to this (as DMD2's full range); none: sigma_max.")
    disc_lr: float = Field(2e-3, gt=0, description="Discriminator learning rate (CTM: 2e-3, §7.5).")
    disc_betas: tuple[float, float] = Field((0.5, 0.999), description="Discriminator Adam betas (a fewstep "
                                            "choice, DCGAN's; the spec gives no value).")
    disc_every_n_steps: int = Field(1, ge=1, description="The discriminator steps on every n-th trainer step of "
                                    "the gan phase, before the student. CTM alternates G and D updates "
                                    "(g_learning_period = 2, one D update per G update); n = 1 keeps that 1:1 "
                                    "ratio on a shared batch.")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="gamma of the sampler (§7.8): 0 deterministic long "
                         "jumps along the ODE (the official headline samples: sony/ctm's `--sampler exact`), "
                         "1 the CM multistep sampler; in between, each jump lands at sqrt(1 - gamma^2) of the "
                         "next level and fresh noise brings it back up.")
    sample_sigmas: dict[int, list[float]] = Field(
        {}, description="Levels t_0 > ... > t_{N-1} of the N-step sampler (t_N = sigma_min is appended), per N; "
        "default: N points of the training grid (fewstep.sampling.grid_levels: every (num_scales // N)-th from "
        "sigma_max), where every (t, s) pair was trained. sony/ctm samples on an (N+1)-point Karras grid "
        "instead, off its 18- or 40-point training grid.")
    clamp: bool = Field(True, description="Clamp pixel samples to [-1, 1] after each jump that lands at "
                        "sigma_min (CM sampler); never applied to latents.")

    @model_validator(mode="after")
    def _check(self) -> CTMConfig:
        if self.num_heun_steps_max > self.num_scales - 1:
            raise ValueError(f"num_heun_steps_max={self.num_heun_steps_max} exceeds num_scales - 1 = "
                             f"{self.num_scales - 1}: the teacher solve cannot leave the grid; lower it or raise "
                             "num_scales")
        lo, hi = self.dsm_weight_clip
        if not 0 <= lo <= hi:
            raise ValueError(f"dsm_weight_clip must be (lo, hi) with 0 <= lo <= hi, got {self.dsm_weight_clip}")
        return self


@hookimpl
def fewstep_method_config():
    return ("ctm", CTMConfig)


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if cfg.name == "ctm" and cfg.gan_start_nimg is not None and cfg.gan_start_nimg >= config.train.total_nimg:
        raise ValueError(f"method.gan_start_nimg={cfg.gan_start_nimg} >= train.total_nimg="
                         f"{config.train.total_nimg}: the gan phase would never run; lower it, or remove it to "
                         "train without the GAN term")
