"""Writes validation samples as a labelled PNG grid: ``RUN/samples/<images seen>.png`` and ``latest.png``."""

from __future__ import annotations

import shutil

from torch import Tensor

from fewstep.hookspecs import hookimpl
from fewstep.images import save_grid_rows
from fewstep.types import Cond, RunContext, StepInfo


@hookimpl
def fewstep_on_validation(ctx: RunContext, step: StepInfo, images: dict[str, Tensor], cond: Cond | None) -> None:
    if not ctx.is_main or not images:
        return
    out = ctx.run_dir / "samples" / f"{step.nimg:09d}.png"
    save_grid_rows(images, out, upscale=ctx.config.validation.upscale)
    shutil.copyfile(out, out.parent / "latest.png")
