"""Default export: the sampling network (EMA when present) as a diffusers pipeline folder.

``RUN/export/`` is written by :func:`fewstep.export.write_export`: the teacher family's stock diffusers
pipeline with a stock scheduler where the method's ``fewstep_stock_sampler`` maps its sampler to one (loads
with plain ``DiffusionPipeline.from_pretrained``), else a :class:`fewstep.export.FewStepPipeline` folder, which
samples with the method's own ``fewstep_sample``. A plugin that writes something else entirely (e.g. the
``diffusion`` method's teacher folder) overrides ``fewstep_export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.types import Nets, RunContext

if TYPE_CHECKING:
    from fewstep.export import StockExport


@hookimpl(trylast=True)
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path, sampling_networks: list[str],
                   stock: StockExport | None, reason: str) -> Path:
    from fewstep.export import run_metrics, write_export

    if not ctx.is_main:
        return out_dir
    return write_export(ctx, nets, out_dir, student=sampling_net(nets), stock=stock, reason=reason,
                        extra={n: nets.get(n) for n in sampling_networks}, metrics=run_metrics(ctx.run_dir))
