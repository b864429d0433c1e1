"""Default export: the sampling network (EMA when present) as a diffusers model folder.

``RUN/export/`` gets ``student/`` (``Backbone.save_pretrained``: diffusers weights and config, plus
fewstep's extra-scalar embeddings), ``scheduler/`` (the teacher's noise process as a diffusers
scheduler config) and ``fewstep_export.json`` (method, steps, teacher, process). Method plugins that
know a stock diffusers pipeline for their sampler override ``fewstep_export``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fewstep.hookspecs import hookimpl
from fewstep.nn import unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Nets, RunContext


@hookimpl(trylast=True)
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path) -> Path:
    if not ctx.is_main:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    unwrap(sampling_net(nets)).save_pretrained(out_dir / "student")
    (out_dir / "scheduler").mkdir(exist_ok=True)
    process = nets.teacher.process
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(process.scheduler_config(), indent=2))
    info = {"method": ctx.method.model_dump(mode="json"), "steps": ctx.config.export.steps,
            "teacher": str(nets.teacher.source), "process": process.describe()}
    (out_dir / "fewstep_export.json").write_text(json.dumps(info, indent=2))
    return out_dir
