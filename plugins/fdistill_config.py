"""Configs of the ``fdistill`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.fdistill` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.hookspecs import hookimpl
from fewstep.method_configs import DistributionMatchingConfig, FDivergence


class FDistillConfig(DistributionMatchingConfig):
    """DMD2 with an f-divergence weighting of the DM step; the GAN head doubles as the ratio estimator."""

    name: Literal["fdistill"] = "fdistill"
    divergence: FDivergence = Field("js", description="The f-divergence D_f(p||q) minimised (fewstep.distribution"
                                    ".F_DIVERGENCES): reverse_kl is DMD2; js is the paper's best on ImageNet-64 and "
                                    "COCO per its abstract, and FastGen's default.")
    ratio: int = Field(5, ge=1, description="Critic updates per generator update (DMD2's TTUR, §2.4: 5).")
    gan_generator_weight: float = Field(3e-3, ge=0.0, description="lambda_G of the generator's GAN term (DMD2 "
                                        "ImageNet 3e-3, FastGen's f-distill ImageNet-64 3e-3).")
    gan_critic_weight: float = Field(1e-2, gt=0.0, description="lambda_D of the discriminator loss (DMD2 1e-2); "
                                     "> 0: the head must train to estimate the density ratio.")
    ratio_clip: tuple[float, float] = Field((0.1, 20.0), description="r = exp(logit) is clipped to this range "
                                            "(FastGen's f-distill default [C, FastGen]).")
    ratio_bins: int = Field(10, ge=0, description="Normalise r by its batch mean within this many equal bins of "
                            "the L_DM level index (FastGen: 10 bins of t); 0: no ratio normalisation. With few "
                            "samples per bin the weights flatten towards DMD2's.")

    @model_validator(mode="after")
    def _one_head(self) -> FDistillConfig:
        if self.gan_heads != "bottleneck" or self.gan_head_grid != 1:
            raise ValueError(f"gan_heads={self.gan_heads!r}, gan_head_grid={self.gan_head_grid}: f-distill reads the "
                             "GAN head's logit as the density ratio, one per sample, so it has one head with one "
                             "logit; set gan_heads: bottleneck and gan_head_grid: 1")
        return self

    @model_validator(mode="after")
    def _ratio_range(self) -> FDistillConfig:
        lo, hi = self.ratio_clip
        if not 0.0 < lo <= 1.0 <= hi:
            raise ValueError(f"ratio_clip={self.ratio_clip}: need 0 < lo <= 1 <= hi (r = 1 where the "
                             "distributions agree must stay in range)")
        return self


@hookimpl
def fewstep_method_config():
    return ("fdistill", FDistillConfig)
