"""Configs of the ``ladd`` and ``add`` methods and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.ladd` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.method_configs import GAN_HEAD_GRID_HELP, GAN_HEADS_HELP, GanHeads, GanLoss

#: The lowest first level at which ``first_input: real`` is accepted. Real samples of std 0.5 (EDM's sigma_data)
#: make up 0.5 / sqrt(0.25 + sigma²) of the input's std: 3 % at SD's timestep 999 (sigma 14.6), 10 % at 5, 24 % at 2.
#: Above about 10 % the one-step student learns to lean on a signal the sampler's pure noise never gives it: on the
#: stock Fashion teacher ADD at sigma 2 scored FID 372 with real inputs against 107 with noise (docs/BENCHMARKS.md,
#: round 26). The 10 % line is this project's choice, not a paper's.
MIN_REAL_INPUT_SIGMA = 5.0


class _Adversarial(MethodConfig):
    sigma_max_is_generator_input: ClassVar[bool] = True

    num_steps: int = Field(1, ge=1, le=64, description="Student levels N (DMD2's generator grid); 1: one step. "
                           "ADD trains SD-Turbo at 4 levels (999, 749, 499, 249) [R].")
    sigma_max: float | None = Field(None, gt=0, description="Level of the first student call; none: the top of "
                                    "the training grid.")
    backward_simulation: bool = Field(False, description="Inputs at level k > 0 from the student's own k steps "
                                      "(DMD2 §2.7); false: real samples noised at level k (ADD).")
    first_input: Literal["noise", "real"] = Field("noise", description="Input of the first level (the one-step "
                                                   "generator's): noise: pure noise at that level, as the sampler "
                                                   "gives it (DMD2); real: real samples noised there, ADD's student "
                                                   "input x_s = alpha_s x_real + sigma_s eps at every level, 999 "
                                                   "included [R]. Choose a level where the real samples' share is "
                                                   "small (SD's 999: sigma 14.6), so that pure noise at sampling "
                                                   "is close to what the student trained on; real below sigma 5 "
                                                   "is refused (MIN_REAL_INPUT_SIGMA).")
    gan_heads: GanHeads = Field("levels", description=GAN_HEADS_HELP + " Here on the frozen teacher; levels is "
                                "LADD's design, and on the Fashion benchmark it lowered ADD's one-step FID from "
                                "114.5 to 68.2 and LADD's from 240.8 to 72.3 (2 seeds each, docs/BENCHMARKS.md "
                                "round 24).")
    gan_head_grid: int = Field(1, ge=1, le=64, description=GAN_HEAD_GRID_HELP)
    gan_loss: GanLoss = Field("hinge", description="Adversarial loss (ADD and LADD: hinge [R]).")
    renoise_mean: float = Field(1.0, description="Mean of log sigma of the discriminator's re-noising (LADD's "
                                "logit-normal location m over flow time; m = 1 favours high noise [R]).")
    renoise_std: float = Field(1.0, gt=0, description="Std of log sigma of the re-noising (LADD's s = 1 [R]).")
    r1_weight: float = Field(0.0, ge=0.0, description="gamma of an approximated R1 penalty on the real samples' "
                             "discriminator inputs, gamma/2 ((D(x + std n) - D(x)) / std)², an estimate of R1's gamma/2 "
                             "||grad D||² (ADD: R1 on real data [R]; APT's approximation [R]; fewstep.gan."
                             "approximate_r1); 0: off (LADD has none).")
    r1_std: float = Field(0.05, gt=0, description="Std of the perturbation of the approximated R1, in the units of "
                          "the discriminator's (re-noised, sigma-space) input; small against the data's scale, large "
                          "enough for the teacher's dtype to resolve (bf16: ~0.004 relative).")
    ratio: int = Field(1, ge=1, description="Discriminator updates per generator update (1: alternate, ADD [R]).")
    disc_lr: float | None = Field(None, gt=0, description="Learning rate of the discriminator head; none: "
                                  "optimizer.lr. On digits equal rates (1e-4) collapsed the student; head 1e-3 "
                                  "with student 2e-5 trained (recipes/digits/ladd.yaml).")

    @model_validator(mode="after")
    def _first_input_level(self) -> _Adversarial:
        if self.first_input == "real" and self.sigma_max is not None and self.sigma_max < MIN_REAL_INPUT_SIGMA:
            share = 0.5 / (0.25 + self.sigma_max ** 2) ** 0.5
            raise ValueError(f"first_input 'real' at sigma_max={self.sigma_max:g} trains the one-step student on "
                             f"inputs whose std is about {share:.0%} real image, but sampling gives it pure noise, so "
                             "it learns to lean on a signal it never gets (on the stock Fashion teacher ADD at sigma "
                             "2: FID 372 with real inputs, 107 with noise); set method.first_input: noise, or "
                             f"sigma_max >= {MIN_REAL_INPUT_SIGMA:g} (ADD's timestep 999 is sigma 14.6), or leave it "
                             "unset (the top of the teacher's grid)")
        return self


class LADDConfig(_Adversarial):
    """LADD: adversarial loss on the teacher's features only, real samples from the teacher's pairs."""

    name: Literal["ladd"] = "ladd"
    real: Literal["pairs", "data"] = Field("pairs", description="Real samples of the discriminator (and of "
                                           "multistep inputs): pairs: the teacher's images from data.pairs (LADD's "
                                           "synthetic data); data: the data set.")


class ADDConfig(_Adversarial):
    """ADD: adversarial loss plus the weighted score-distillation term of the teacher."""

    name: Literal["add"] = "add"
    real: Literal["pairs", "data"] = Field("data", description="Real samples: data (ADD's real images) or pairs.")
    renoise_mean: float = Field(-3.0, description="Mean of log sigma of the discriminator's re-noising. ADD's "
                                "discriminator reads clean images [R]; a diffusion-feature discriminator needs some "
                                "noise, and a low level is the nearest: on the Fashion benchmark -3 (median sigma "
                                "0.05) lowered the one-step FID from 68.2 at 0 to 46.7 (-2: 50.8; 2 seeds each, "
                                "docs/BENCHMARKS.md round 25). LADD's m = 1 favours high noise [R].")
    distill_weight: float = Field(2.5, ge=0.0, description="lambda of the distillation term (ADD: 2.5 [R]).")
    distill_weighting: Literal["alpha_bar", "uniform"] = Field("alpha_bar", description="c(t) of the distillation "
                                                               "term: alpha_bar = 1/(1 + sigma²) (ADD's exponential "
                                                               "weighting [R]) or 1.")
    real_guidance: float | None = Field(None, ge=0.0, description="Guidance of the teacher's distillation target; "
                                        "none: teacher.guidance.")
    distill_t_range: tuple[float, float] = Field((0.02, 0.98), description="Fractions of the training grid whose "
                                                 "levels the distillation term draws from, uniformly by index "
                                                 "(as DMD's L_DM; ADD's range is not verified).")

    @model_validator(mode="after")
    def _range(self) -> ADDConfig:
        lo, hi = self.distill_t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"distill_t_range={self.distill_t_range}: need 0 <= lo <= hi <= 1")
        return self


@hookimpl
def fewstep_method_config():
    return [("ladd", LADDConfig), ("add", ADDConfig)]


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if isinstance(cfg, _Adversarial) and cfg.real == "pairs" and config.data.pairs is None:
        raise ValueError(f"method {cfg.name}: real 'pairs' reads the teacher's images from a pair store, but "
                         "data.pairs is not set; make one with `fewstep pairs TEACHER OUT --num N` and set "
                         "data.pairs: OUT, or set method.real: data")
