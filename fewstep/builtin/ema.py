"""Evaluation EMA of the student (disable with ``plugins.disable: [ema]``).

The half-life is in images seen, so it survives batch-size changes (EDM2 Eq. 1 style):
beta = 0.5 ** (global_batch / halflife), with the half-life capped at ``rampup_ratio * nimg`` early in
training (EDM Appendix F.3). The EMA is an extra network named ``ema``: it is checkpointed with the
others and used by samplers through ``Nets.ema``. It is separate from any target network a method uses.
"""

from __future__ import annotations

from torch import nn

from fewstep.hookspecs import hookimpl
from fewstep.nn import ema_update, frozen_copy
from fewstep.types import Nets, OptimizerGroup, RunContext, StepInfo


def ema_beta(nimg: int, batch: int, halflife_nimg: float, rampup_ratio: float | None) -> float:
    """Per-step EMA decay after ``nimg`` images (a pure function of progress)."""
    halflife = halflife_nimg if rampup_ratio is None else min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


@hookimpl
def fewstep_extra_networks(ctx: RunContext, student: nn.Module) -> dict[str, nn.Module]:
    return {"ema": frozen_copy(student).float()}


@hookimpl
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets, step: StepInfo) -> None:
    if "student" not in group.modules or nets.ema is None:
        return
    cfg = ctx.config.ema
    ema_update(nets.ema, nets.student, ema_beta(step.nimg + ctx.global_batch, ctx.global_batch,
                                                cfg.halflife_nimg, cfg.rampup_ratio))
