"""Default export: the sampling network (EMA when present) as a diffusers pipeline folder.

``RUN/export/`` is written by :func:`fewstep.export.write_export`: ``DiffusionPipeline.from_pretrained``
loads it offline as a :class:`fewstep.export.FewStepPipeline`, which samples with the method's own
``fewstep_sample``. Method plugins that know a stock diffusers pipeline for their sampler override
``fewstep_export`` (and return None where it does not apply, so this default runs).
"""

from __future__ import annotations

from pathlib import Path

from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.types import Nets, RunContext


@hookimpl(trylast=True)
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path, sampling_networks: list[str]) -> Path:
    from fewstep.export import run_metrics, write_export

    if not ctx.is_main:
        return out_dir
    return write_export(ctx, nets, out_dir, student=sampling_net(nets),
                        extra={n: nets.get(n) for n in sampling_networks}, metrics=run_metrics(ctx.run_dir))
