"""Configs of the ``caf`` and ``reflow`` methods and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.caf` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.method_configs import GanLoss


class _Flow(MethodConfig):
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("l2", description="Distance of the regression loss "
                                                          "(fewstep.losses.distance).")
    huber_c: float | None = Field(None, gt=0, description="Pseudo-Huber c; none: 0.00054 * D, CAF's repo constant "
                                  "(§8.5; not iCT's sqrt(D)).")


class CAFConfig(_Flow):
    """CAF: v_theta (velocity stage), then a_phi with IVC (acceleration), optionally adversarial (§8.2-8.6)."""

    name: Literal["caf"] = "caf"
    h: float = Field(1.5, gt=0.0, le=2.0, description="Initial-velocity scale, v0 = h (x1 - z) (CAF §8.3: 1.5 for "
                     "all image runs; 1 is rectified flow). Up to 2, where c_h(t) stays monotone.")
    distance: Literal["l2", "l1", "pseudo_huber"] = Field("pseudo_huber", description="Distance of the velocity "
                                                          "and acceleration losses (CAF: LPIPS-Huber, §8.5; LPIPS is "
                                                          "not offered).")
    reflow_nimg: int = Field(0, ge=0, description="Images of phase reflow, v_theta as a rectified flow (h = 1) "
                             "before the velocity phase; 0: none (a fewstep option).")
    velocity_nimg: int | None = Field(None, ge=0, description="Images of phase velocity (v_theta with h); none: "
                                      "half of what reflow and gan leave (CAF trains both stages equally long, "
                                      "§8.5); 0: none (with reflow_nimg > 0: reflow instead).")
    gan_nimg: int = Field(0, ge=0, description="Images of the final adversarial phase gan (§8.6); 0: none. The "
                          "acceleration phase gets the rest of train.total_nimg.")
    time_levels: int = Field(1000, ge=1, description="Training times t uniform on {0, 1/L, ..., 1} (CAF §8.5: "
                             "L = 1000).")
    gan_lr: float = Field(2e-5, gt=0, description="Learning rate of a_phi in the gan phase (CAF §8.6).")
    disc_lr: float = Field(1e-3, gt=0, description="Learning rate of the discriminator (CAF §8.6).")
    gan_every: int = Field(2, ge=1, description="a_phi steps every this many trainer steps in the gan phase, the "
                           "discriminator every step (CAF repo g_learning_period = 2, read as D:G = 2:1 [R]).")
    gan_loss: GanLoss = Field("hinge", description="GAN loss (CAF repo: hinge, §8.6).")
    gan_real: Literal["data", "pairs"] = Field("data", description="Real samples of the discriminator: data: the "
                                               "data set (CAF §8.6); pairs: the teacher images x1 of the couplings.")

    def run_length_use(self) -> str | None:
        if self.velocity_nimg is None:
            return "phase velocity takes half of what reflow and gan leave of train.total_nimg"
        if self.gan_nimg:
            return f"phase gan takes the last gan_nimg={self.gan_nimg} images of train.total_nimg"
        return None


class ReflowConfig(_Flow):
    """2-rectified flow on the teacher's couplings (distribution.md §8.2), N-step Euler sampler."""

    name: Literal["reflow"] = "reflow"
    t_eps: float = Field(1e-3, ge=0.0, lt=1.0, description="Training times t ~ U(t_eps, 1) (rectified flow "
                         "code: 1e-3, distribution.md §8.1).")


def caf_phases(cfg: CAFConfig, total_nimg: int) -> list[tuple[str, int]]:
    """(phase, images) in order: reflow, velocity, acceleration, gan; phases of 0 images are left out."""
    velocity = cfg.velocity_nimg
    if velocity is None:
        velocity = (total_nimg - cfg.reflow_nimg - cfg.gan_nimg) // 2
    acceleration = total_nimg - cfg.reflow_nimg - velocity - cfg.gan_nimg
    spans = [("reflow", cfg.reflow_nimg), ("velocity", velocity), ("acceleration", acceleration),
             ("gan", cfg.gan_nimg)]
    return [(name, n) for name, n in spans if n > 0]


@hookimpl
def fewstep_method_config():
    return [("caf", CAFConfig), ("reflow", ReflowConfig)]


@hookimpl
def fewstep_configure(config) -> None:
    cfg = config.method
    if not isinstance(cfg, (CAFConfig, ReflowConfig)):
        return
    if config.data.pairs is None:
        raise ValueError(f"method {cfg.name!r} trains on teacher couplings, but data.pairs is not set; make a "
                         "store with `fewstep pairs TEACHER OUT --num N --steps K` and set data.pairs: OUT")
    if isinstance(cfg, CAFConfig):
        phases = dict(caf_phases(cfg, config.train.total_nimg))
        if "acceleration" not in phases:
            raise ValueError(f"method caf: reflow_nimg + velocity_nimg + gan_nimg leave no images for the "
                             f"acceleration phase out of train.total_nimg={config.train.total_nimg}; shorten them "
                             "or raise train.total_nimg")
        if not {"reflow", "velocity"} & set(phases):
            raise ValueError("method caf: reflow_nimg and velocity_nimg are both 0, so v_theta is never trained; "
                             "give one of them images")
        if "velocity" not in phases and cfg.h != 1.0:
            raise ValueError(f"method caf: velocity_nimg is 0, so v_theta is only the reflow (h = 1) velocity, but "
                             f"method.h={cfg.h:g} would read a_phi at the levels and targets of initial velocity "
                             f"h(x1 - z); set method.h: 1.0, or give velocity_nimg images to train v_theta with h")
