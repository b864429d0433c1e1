"""Configs of the ``kd`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.kd` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.method_configs import Distance


class KDConfig(MethodConfig):
    """One-step (or N-level) regression of the student onto the teacher's ODE couplings."""

    name: Literal["kd"] = "kd"
    distance: Distance = Field("l2", description="Distance d(G(z), y) on model-space samples (fewstep.losses): "
                               "l2 (per-element mean, the paper's squared error [R]), l1, or pseudo_huber.")
    huber_c: float | None = Field(None, gt=0, description="Pseudo-Huber c; none: iCT's 0.00054·sqrt(D).")
    num_steps: int = Field(1, ge=1, le=64, description="Student levels N: 1 is the paper's one-step student; "
                           "N > 1 also trains on noised teacher images at DMD2's grid levels (a fewstep "
                           "extension, see the module docstring).")


@hookimpl
def fewstep_method_config():
    return ("kd", KDConfig)


@hookimpl
def fewstep_configure(config) -> None:
    if config.method.name == "kd" and config.data.pairs is None:
        raise ValueError("method kd regresses onto the teacher's ODE solutions, but data.pairs is not set; make a "
                         "store with `fewstep pairs TEACHER OUT --num N --steps K` and set data.pairs: OUT")
