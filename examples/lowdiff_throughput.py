"""Samples per CPU-second of a LowDiff cascade against its plain teacher, interleaved in one process.

    OMP_NUM_THREADS=1 python examples/lowdiff_throughput.py runs/fashion-lowdiff runs/fashion-teacher \\
        --lowdiff 8 --set method.start_sigma=2.0 --set "method.stage_steps={8: [8, 4, 4]}" --teacher 4 6 8

Both runs are rebuilt from their folders (``fewstep sample`` / ``eval`` do the same) and sampled through their
method's ``fewstep_sample``: the LowDiff run at each ``--lowdiff`` step count with the ``--set`` overrides, the
teacher's own run (method ``diffusion``: its Heun sampler, the sampler of the benchmark's teacher rows) at each
``--teacher`` count. One round samples one batch with every configuration in turn, the order reversed every
other round, so load drift on a shared machine falls on all of them alike; each is timed in process CPU time
(``time.process_time``: the time the process ran, not the time it waited for a core) and the median over the
rounds is reported, with the quartiles, as samples per CPU-second. Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def samplers(run: Path, overrides: list[str], step_counts: list[int], batch: int, seed: int, label: str):
    """{"LABEL N steps": a closure sampling one class-conditional batch of the run at N steps} for each N, all on
    the same rebuilt run, noise and labels."""
    from fewstep.cli import _built_run
    from fewstep.sampling import generate
    from fewstep.types import Cond

    trainer, pm = _built_run(run, overrides=overrides)
    teacher = trainer.nets.teacher
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *teacher.sample_shape), generator=g)
    cond = None
    if teacher.conditioning == "class":
        cond = Cond(labels=torch.randint(0, teacher.num_classes, (batch,), generator=g))

    def at(num_steps: int):
        return lambda: generate(pm.hook, trainer.ctx, trainer.nets, noise, cond, num_steps, seed=seed)

    return {f"{label} {n} steps": at(n) for n in step_counts}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lowdiff_run", type=Path)
    ap.add_argument("teacher_run", type=Path, help="the teacher's own training run (method diffusion)")
    ap.add_argument("--lowdiff", type=int, nargs="+", required=True, help="LowDiff step counts N")
    ap.add_argument("--teacher", type=int, nargs="+", required=True, help="teacher step counts")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for the LowDiff run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    configs = samplers(args.lowdiff_run, args.overrides, args.lowdiff, args.batch, args.seed, "lowdiff")
    configs |= samplers(args.teacher_run, [], args.teacher, args.batch, args.seed, "teacher")
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    with torch.no_grad():
        for r in range(args.warmup + args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.process_time()
                configs[name]()
                if r >= args.warmup:
                    times[name].append(time.process_time() - t0)
    result = {"lowdiff_run": str(args.lowdiff_run), "teacher_run": str(args.teacher_run), "overrides": args.overrides,
              "batch": args.batch, "rounds": args.rounds, "clock": "process CPU time, 1 thread", "configs": {}}
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        result["configs"][name] = {"samples_per_cpu_s": args.batch / med, "quartiles": [args.batch / q3, args.batch / q1],
                                   "cpu_s_per_batch": med}
        print(f"{name:22s} {args.batch / med:8.1f} samples per CPU-second "
              f"(quartiles {args.batch / q3:.1f} - {args.batch / q1:.1f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
