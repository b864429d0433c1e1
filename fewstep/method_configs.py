"""Config bases shared by several method plugins, import-light (pydantic and the standard library) so that
discovery and ``fewstep validate`` read every method's config without torch: the distribution-matching fields
(``dmd``, ``dmd2``, ``msd``, ``fdistill``; re-exported by :mod:`fewstep.distribution`), the JVP-tangent options
(``scm``, ``flowmap``, ``meanflow``; re-exported by :mod:`fewstep.jvp`) and the check of a cascade's resolutions
(``lowdiff``; re-exported by :mod:`fewstep.cascade`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from fewstep.config import MethodConfig

__all__ = ["Distance", "DistributionMatchingConfig", "FDivergence", "GAN_HEAD_GRID_HELP", "GAN_HEADS_HELP", "GanHeads",
           "GanLoss",
           "TangentOptions", "check_pair_guidance", "check_resolutions", "check_sample_guidance", "student_guidance"]

# Option types of method configs, re-exported by the modules that implement them.
Distance = Literal["l2", "l1", "pseudo_huber"]  # fewstep.losses.distance
GanLoss = Literal["nonsaturating", "hinge"]  # fewstep.gan
GanHeads = Literal["bottleneck", "levels"]  # fewstep.gan.make_head
GAN_HEADS_HELP = ("Discriminator heads on a backbone's features (fewstep.gan.make_head): bottleneck: one head on "
                  "the bottleneck map (only the encoder runs); levels: one head per feature level (UNets: the mid "
                  "and every up block; transformers: every block), LADD's independent heads [R], each with its "
                  "own loss, averaged over heads; costs the backbone's full forward per critic call.")
GAN_HEAD_GRID_HELP = ("Logits per discriminator head (fewstep.gan.BottleneckHead): 1: one per image (DMD2's head); "
                      "g > 1: a g x g grid of patch logits, each judging its region of the image, every cell with "
                      "its own loss, averaged (PatchGAN; ADD's heads judge every feature token [R]). g must not "
                      "exceed the side of the smallest feature map a head reads.")
FDivergence = Literal["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "softened_rkl",
                      "neyman_chi2"]  # fewstep.distribution.F_DIVERGENCES


def check_pair_guidance(config: Any) -> None:
    """Refuse a regression pair store made at another guidance scale than the real score's (§1.4: the pairs
    are the *guided* teacher's ODE solutions, so L_reg and L_DM pull towards the same distribution).

    config: a run config whose ``data.pairs`` is set; a folder without a manifest is left to the data loader
    to explain."""
    manifest = Path(config.data.pairs) / "manifest.json"
    if not manifest.is_file():
        return
    made = float(json.loads(manifest.read_text())["guidance"])
    g = config.method.real_guidance if config.method.real_guidance is not None else config.teacher.guidance
    if abs(made - g) > 1e-6:
        raise ValueError(f"data.pairs: {manifest.parent} was made at guidance {made:g} but the real score uses "
                         f"{g:g} (method.real_guidance, else teacher.guidance), so the regression and the DM "
                         "gradient would pull towards different distributions; make the pairs with "
                         f"`fewstep pairs TEACHER OUT --guidance {g:g}` or set the real guidance to {made:g}")


class DistributionMatchingConfig(MethodConfig):
    """Fields shared by ``dmd``, ``dmd2`` and ``msd``; each method sets its own defaults on top."""

    sigma_max_is_generator_input: ClassVar[bool] = True

    real_guidance: float | None = Field(
        None, ge=0.0, description="Guidance scale g_real of the real score (CFG, or autoguidance with "
        "teacher.autoguidance); the fake score is never guided (§1.2 [C]). none: teacher.guidance, so the "
        "validation teacher row shows the distribution the student is pulled to. DMD2: 1 on ImageNet, 1.75 "
        "SD1.5, 8 SDXL (§2.5).")
    dm_t_range: tuple[float, float] = Field(
        (0.02, 0.98), description="Fractions of the training grid whose levels L_DM draws from, uniformly "
        "by index (DreamFusion clip; DMD2 min/max_step_percent 0.02/0.98, indices [20, 980], §1.2 [C]).")
    num_steps: int = Field(1, ge=1, le=64, description="Generator steps N; the levels are grid indices "
                           "T-1, T-1-T/N, ... (DMD2 §2.7: 999, 749, 499, 249 for N = 4). 1: one-step.")
    sigma_max: float | None = Field(None, gt=0, description="Level of the first generator call (input "
                                    "sigma_max * z); none: the top of the training grid (VP t = 999, EDM 80, "
                                    "§1.1).")
    levels: list[float] | None = Field(
        None, description="Explicit sigma-space levels of the N generator calls, descending, one per step "
        "(len = num_steps), each snapped to the nearest level of the training grid (a DDPM teacher is fitted at "
        "its integer timesteps only, and the stock LCMScheduler export needs them); replaces the evenly spaced "
        "indices below sigma_max (set one of the two). k-step sampling uses entries 0, N/k, 2N/k, ... (k <= N; more "
        "steps split the grid evenly below the first level). "
        "VP sigma = sqrt((1 - alphabar_t) / alphabar_t) at timestep t.")
    backward_simulation: bool = Field(True, description="Multistep training inputs from the generator's own "
                                      "earlier steps (DMD2 §2.7 default); false: noised real images "
                                      "(ADD-like, needs images).")
    ratio: int = Field(1, ge=1, description="TTUR: critic updates per generator update (the generator group "
                       "steps every `ratio` trainer steps, the critic every step). DMD: 1 (§1.5); DMD2: 5 "
                       "ImageNet/SDXL, 10 SD1.5 (§2.4 [C]).")
    critic_lr: float | None = Field(None, gt=0, description="Learning rate of the fake score (and GAN head); "
                                    "none: optimizer.lr (DMD2 uses one rate for both, §2.8 [C]).")
    gan_generator_weight: float = Field(0.0, ge=0.0, description="lambda_G of the generator's non-saturating "
                                        "GAN term; 0: no GAN (DMD2 ImageNet 3e-3, SD1.5 1e-3, SDXL 5e-3, §2.3(d)).")
    gan_critic_weight: float = Field(0.0, ge=0.0, description="lambda_D of the discriminator loss added to "
                                     "the critic's (DMD2: 1e-2 everywhere, §2.3(d)).")
    gan_t_max: float = Field(1.0, gt=0.0, le=1.0, description="Diffusion-GAN noise: levels drawn uniformly "
                             "from this lowest fraction of the training grid (DMD2: the full range, §2.3(c)).")
    gan_heads: GanHeads = Field("bottleneck", description=GAN_HEADS_HELP + " DMD2: one head on the fake score's "
                                "bottleneck (§2.3(c)).")
    gan_head_grid: int = Field(1, ge=1, le=64, description=GAN_HEAD_GRID_HELP + " DMD2: 1 (§2.3(c)).")

    @model_validator(mode="after")
    def _check_shared(self) -> DistributionMatchingConfig:
        lo, hi = self.dm_t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"dm_t_range={self.dm_t_range}: need 0 <= lo <= hi <= 1 (fractions of the grid)")
        if self.levels is not None:
            if len(self.levels) != self.num_steps:
                raise ValueError(f"levels={self.levels}: {len(self.levels)} levels for num_steps={self.num_steps}; "
                                 "list one sigma per generator step")
            if any(v <= 0 for v in self.levels) or any(a <= b for a, b in zip(self.levels, self.levels[1:])):
                raise ValueError(f"levels={self.levels}: need positive sigmas in strictly descending order (the "
                                 "first generator call is the noisiest)")
            if self.sigma_max is not None:
                raise ValueError(f"levels={self.levels} and sigma_max={self.sigma_max}: set one of them (the first "
                                 "of the levels is the generator's input level)")
        if (self.gan_generator_weight > 0) != (self.gan_critic_weight > 0):
            raise ValueError(f"gan_generator_weight={self.gan_generator_weight} and gan_critic_weight="
                             f"{self.gan_critic_weight}: set both > 0 for the GAN term (DMD2: 3e-3 and 1e-2) "
                             "or both to 0 (a head nobody trains, or trains for nobody, is wasted)")
        return self

    @property
    def adversarial(self) -> bool:
        return self.gan_critic_weight > 0


class TangentOptions(MethodConfig):
    """Config fields of a method trained with a normalised JVP tangent (sCM §6.2, AYF §9.2)."""

    tangent_norm: Literal["normalize", "clip", "none"] = Field(
        "normalize", description="normalize: g/(||g|| + c) per sample (sCM, AYF); clip: g clamped to [-1, 1] (sCM's "
        "alternative); none: raw g (for tests and ablations).")
    tangent_c: float = Field(0.1, gt=0, description="c of the tangent normalisation (sCM and AYF: 0.1).")
    jvp: Literal["auto", "exact", "finite_difference"] = Field(
        "auto", description="exact: forward-mode AD (torch.func.jvp, the papers'); finite_difference: central "
        "difference (along the trajectory over ±fd_window teacher timesteps for a VP teacher); auto: "
        "finite_difference for DDPM (VP) teachers, exact for EDM and flow teachers. A DDPM teacher is fitted at "
        "integer timesteps only and oscillates between them; on the digits teacher exact tangents were 1.5-9x off "
        "a 48-timestep average and gave noise samples, fd_window 12 gave clean ones (module docstring).")
    fd_window: float = Field(12.0, gt=0, description="Half-width of the finite difference of a VP teacher, in its "
                             "timestep input (DDPM timesteps; 12 = two periods of the ~6-timestep oscillation, "
                             "measured: 2 left 2-step sCM samples noisy on digits). EDM and flow teachers take the "
                             "small float step of `jvp` instead.")


def check_flow_sample_times(sample_times: dict[int, list[float]]) -> None:
    """Validate a flow-time sampler (flow maps, MeanFlow): N + 1 strictly decreasing times in [0, 1) per N."""
    for n, times in sample_times.items():
        if len(times) != n + 1 or any(not 0 <= b < a < 1 for a, b in zip(times, times[1:])):
            raise ValueError(f"method.sample_times[{n}]: need {n + 1} decreasing flow times in [0, 1), got {times}")


def check_sample_guidance(sample_guidance: float | dict[int, float] | None) -> None:
    """Validate a guided student's sampling guidance (sCM, flow maps): a scale >= 0, or one per step count >= 1."""
    scales = sample_guidance if isinstance(sample_guidance, dict) else {1: sample_guidance}
    for n, w in scales.items():
        if n < 1 or (w is not None and w < 0):
            raise ValueError(f"method.sample_guidance: need a scale >= 0, or {{steps >= 1: scale >= 0}}, got "
                             f"{sample_guidance}")


def student_guidance(guidance: tuple[float, float] | None, sample_guidance: float | dict[int, float] | None,
                     num_steps: int) -> float | None:
    """The scale a guided student (trained on w ~ U[guidance]) is given when sampling in ``num_steps`` steps:
    ``sample_guidance`` (a float for every step count, or a dict's entry for this one), else the middle of the
    training range; None for an unguided student (``guidance`` None)."""
    if guidance is None:
        return None
    w = sample_guidance.get(num_steps) if isinstance(sample_guidance, dict) else sample_guidance
    return w if w is not None else sum(guidance) / 2


def check_resolutions(resolutions: Sequence[int], size: int | None = None) -> list[int]:
    """Validate a cascade: strictly increasing sizes, each dividing the next, the last equal to ``size``."""
    res = [int(r) for r in resolutions]
    if not res or any(r < 1 for r in res):
        raise ValueError(f"cascade resolutions {res}: give at least one positive size, lowest first")
    for lo, hi in zip(res, res[1:]):
        if hi <= lo or hi % lo:
            raise ValueError(f"cascade resolutions {res}: each size must be a multiple (> 1x) of the one before "
                             f"({lo} -> {hi} is not)")
    if size is not None and res[-1] != size:
        raise ValueError(f"cascade resolutions {res} end at {res[-1]}, but the model-space size is {size}; "
                         f"make the last resolution {size}")
    return res
