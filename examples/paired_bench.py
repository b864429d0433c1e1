"""Paired benchmark: fewstep's CD step against the hand-written loop of the same maths (examples/hand_cd_loop.py).

Time: one process with one torch thread builds both loops, then runs ``--pairs`` pairs; a pair is ``--steps``
steps of one loop immediately followed by ``--steps`` steps of the other (the order alternates), after
``--warmup`` unmeasured steps of each. On a machine shared with other jobs absolute times drift by tens of
percent; the two halves of a pair share the drift, so the median of the per-pair ratios is the number to
read (docs/SPEED.md). Each half is timed twice: wall time, and the process's CPU time (``time.process_time``,
one torch thread), which leaves out the time the process waited for a core while other jobs ran, so it is the
steadier of the two on a loaded machine. Minor page faults per step (``ru_minflt``: memory the allocator handed
back to the system and touched again) are counted for each half too: they cost CPU time in the kernel. Memory: ``--memory-runs`` fresh processes per loop (peak resident
memory of the whole process, imports included), compared by their medians.

The hand loop runs the same non-finite guard as fewstep's step (gradient norm, fused Adam skipping a
non-finite step on the device); ``--hand-no-guard`` drops it from the hand loop (fewstep keeps its guard).
Both take one Heun teacher step per grid interval: the recipe's ``method.substeps`` is set to 1 here.

    python examples/paired_bench.py --pairs 20 --steps 3 --out docs/benchmarks/paired_cd.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEWSTEP_MEMORY = """
import json, resource, sys, tempfile
from fewstep.bench import bench_trainer, run_step
from fewstep.config import load_config
from fewstep.plugin import build_manager, discover
plugins = discover()
config = load_config(sys.argv[1], plugins=plugins)
config = config.model_copy(update={"method": config.method.model_copy(update={"substeps": 1})})
pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
trainer = bench_trainer(config, pm, tempfile.mkdtemp(), int(sys.argv[2]))
for _ in range(int(sys.argv[2])):
    run_step(trainer)
print(json.dumps({"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(loop: str, recipe: Path, steps: int, guard: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if loop == "fewstep":
        cmd = [sys.executable, "-c", FEWSTEP_MEMORY, str(recipe), str(steps)]
    else:
        cmd = [sys.executable, str(ROOT / "examples" / "hand_cd_loop.py"), "--warmup", "1", "--steps", str(steps - 1),
               *([] if guard else ["--no-guard"])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_memory_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits" / "cd.yaml")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="steps of each loop per pair")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--hand-no-guard", action="store_true", help="the hand loop without the non-finite guard")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    guard = not args.hand_no_guard
    # First, while this process is small: Linux children inherit the parent's peak resident memory at fork
    # (ru_maxrss survives exec), so measuring after the models are built would report the parent's peak.
    mem = {loop: [memory(loop, args.recipe, 3, guard) for _ in range(args.memory_runs)] for loop in ("fewstep", "hand")}

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    from hand_cd_loop import HandCD

    from fewstep.bench import bench_trainer, run_step
    from fewstep.config import load_config
    from fewstep.plugin import build_manager, discover

    plugins = discover()
    config = load_config(args.recipe, plugins=plugins)
    # the hand loop takes one Heun teacher step per grid interval (CM); the recipe's substeps: 2 takes two
    config = config.model_copy(update={"method": config.method.model_copy(update={"substeps": 1})})
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
    trainer = bench_trainer(config, pm, Path(tempfile.mkdtemp(prefix="paired-")), args.warmup + args.pairs * args.steps)
    hand = HandCD(guard=guard)
    loops = {"fewstep": lambda: run_step(trainer), "hand": hand.step}
    for step in loops.values():
        for _ in range(args.warmup):
            step()
    pairs = []
    for i in range(args.pairs):
        order = ("fewstep", "hand") if i % 2 == 0 else ("hand", "fewstep")
        seconds, cpu, faults = {}, {}, {}
        for name in order:
            t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.steps):
                loops[name]()
            seconds[name] = (time.perf_counter() - t0) / args.steps
            cpu[name] = (time.process_time() - c0) / args.steps
            faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps
        pairs.append({"time_ratio": seconds["fewstep"] / seconds["hand"], "fewstep_step_s": seconds["fewstep"],
                      "hand_step_s": seconds["hand"], "cpu_ratio": cpu["fewstep"] / cpu["hand"],
                      "fewstep_cpu_s": cpu["fewstep"], "hand_cpu_s": cpu["hand"],
                      "fewstep_page_faults": faults["fewstep"], "hand_page_faults": faults["hand"]})
        print(json.dumps({"pair": i, **pairs[-1]}), flush=True)
    summary = {"pairs": len(pairs), "steps_per_half": args.steps, "warmup": args.warmup, "torch_threads": 1,
               "hand_guard": guard, "load_average": os.getloadavg(),
               "median_time_ratio": statistics.median(p["time_ratio"] for p in pairs),
               "quartiles_time_ratio": statistics.quantiles([p["time_ratio"] for p in pairs], n=4),
               "median_cpu_ratio": statistics.median(p["cpu_ratio"] for p in pairs),
               "quartiles_cpu_ratio": statistics.quantiles([p["cpu_ratio"] for p in pairs], n=4),
               "median_fewstep_step_s": statistics.median(p["fewstep_step_s"] for p in pairs),
               "median_hand_step_s": statistics.median(p["hand_step_s"] for p in pairs),
               "median_page_faults_per_step": {k: statistics.median(p[f"{k}_page_faults"] for p in pairs)
                                               for k in ("fewstep", "hand")},
               "peak_memory_mb": {k: statistics.median(v) for k, v in mem.items()},
               "memory_ratio": statistics.median(mem["fewstep"]) / statistics.median(mem["hand"])}
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python examples/paired_bench.py " + " ".join(sys.argv[1:]),
                                        "summary": summary, "pairs": pairs, "memory_runs": mem}, indent=2))


if __name__ == "__main__":
    main()
