"""Configs of the ``msd`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.msd` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewstep.data_config import run_teacher_info
from fewstep.hookspecs import hookimpl
from fewstep.method_configs import DistributionMatchingConfig, check_pair_guidance


class MSDConfig(DistributionMatchingConfig):
    """MSD: K students by condition; DMD2's TTUR and GAN defaults (the paper's ADM stage)."""

    name: Literal["msd"] = "msd"
    num_students: int = Field(4, ge=1, description="K students (MSD ImageNet / COCO: 4, §3.2).")
    width: float = Field(1.0, gt=0.0, le=1.0, description="Channel-width factor of the students; 1: the "
                         "teacher's size, initialised from it; < 1: smaller students, trained by TSM first "
                         "(MSD: 42% fewer parameters, §3.4).")
    tsm_nimg: int = Field(20000, ge=1, description="Images of the TSM phase (only when width < 1; the paper's "
                          "length is not verified, §11).")
    adm_nimg: int = Field(20000, ge=0, description="Images of the final ADM phase, in which the generator's "
                          "GAN term is on (a short fine-tune, §3.3); ignored without GAN weights.")
    shared_fake_score: bool = Field(False, description="One conditional fake score (and head) for all "
                                    "students instead of one each (see the module docstring).")
    regression_weight: float = Field(0.0, ge=0.0, description="lambda_reg of DMD's regression on the pair store "
                                     "in phases dm/adm (§3.3 DM stage, DMD-style: 0.25); 0: DMD2's TTUR variant.")
    regression_distance: Literal["l2", "l1", "pseudo_huber"] = Field("l2", description="Regression distance "
                                                                     "(LPIPS is a download; l2 stands in).")
    ratio: int = Field(5, ge=1, description="Critic updates per generator update (DMD2 ImageNet: 5, §2.4).")
    gan_generator_weight: float = Field(3e-3, ge=0.0, description="lambda_G in phase adm (DMD2 ImageNet: 3e-3).")
    gan_critic_weight: float = Field(1e-2, ge=0.0, description="lambda_D (DMD2: 1e-2).")

    def run_length_use(self) -> str | None:
        if not self.adversarial:
            return None
        return f"phase adm takes the last adm_nimg={self.adm_nimg} images of train.total_nimg"

    @model_validator(mode="after")
    def _check(self) -> MSDConfig:
        if self.adversarial and self.adm_nimg == 0:
            raise ValueError("adm_nimg=0 with GAN weights: the generator's GAN term would never switch on; give "
                             "adm_nimg > 0 or set both GAN weights to 0")
        return self


def check_partition(k: int, conditioning: str, num_classes: int | None) -> None:
    """Refuse K students that the teacher's conditions cannot be split between (module docstring of
    :mod:`fewstep_plugins.msd`): checked from the teacher folder's configs before anything is built
    (``fewstep_configure``) and on the loaded teacher (``fewstep_build_student``)."""
    if k == 1:
        return
    if conditioning == "none":
        raise ValueError(f"method.num_students={k}: msd partitions the conditions, but the teacher is "
                         "unconditional; use a class- or text-conditional teacher, or num_students: 1")
    if conditioning == "class" and num_classes is not None and k > num_classes:
        raise ValueError(f"method.num_students={k} > {num_classes} classes: some student would own no "
                         "class; use at most as many students as classes")
    if conditioning == "text" and k & (k - 1):
        raise ValueError(f"method.num_students={k}: text prompts are routed by sign bits of the pooled "
                         "embedding, so K must be a power of two (2, 4, 8)")


@hookimpl
def fewstep_method_config():
    return ("msd", MSDConfig)


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if "ema" not in config.plugins.disable:
        raise ValueError("method msd: the evaluation EMA averages only `student` (student 0 of K), so a routed "
                         "sampler would mix averaged and raw students; add `plugins: {disable: [ema]}` to the "
                         "recipe (DMD2 and MSD use no EMA)")
    if cfg.regression_weight > 0 and config.data.pairs is None:
        raise ValueError("method.regression_weight > 0 needs a pair store: `fewstep pairs TEACHER OUT --num N` "
                         "and data.pairs: OUT (or set regression_weight: 0)")
    if cfg.regression_weight > 0:
        check_pair_guidance(config)
    before = (cfg.tsm_nimg if cfg.width < 1 else 0) + (cfg.adm_nimg if cfg.adversarial else 0)
    if before >= config.train.total_nimg:
        raise ValueError(f"train.total_nimg={config.train.total_nimg} leaves no images for phase dm after "
                         f"method.tsm_nimg and method.adm_nimg ({before}); raise it or shorten those phases")
    if (info := run_teacher_info(config)) is not None:  # from the folder's JSON configs
        check_partition(cfg.num_students, info.conditioning, info.num_classes)
