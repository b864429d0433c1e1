"""Paired benchmark: fewstep's CD step against the hand-written loop of the same maths (examples/hand_cd_loop.py).

Each pair runs both loops as fresh processes, one after the other (the order alternates), each with one
torch thread, ``--warmup`` unmeasured then ``--steps`` measured steps. On a machine shared with other jobs
absolute times drift by tens of percent; the ratio of the two halves of a pair shares the drift, so the
median ratio over pairs is the number to read (docs/SPEED.md).

    python examples/paired_bench.py --pairs 20 --steps 8 --out docs/benchmarks/paired_cd.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEWSTEP = """
import json, sys
from fewstep.bench import bench
from fewstep.config import load_config
from fewstep.plugin import build_manager, discover
plugins = discover()
config = load_config(sys.argv[1], ["train.progress_bar=false"], plugins=plugins)
pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
r = bench(config, pm, warmup=int(sys.argv[2]), steps=int(sys.argv[3]), detail=False)
print(json.dumps({"loop": "fewstep", "step_s": r["step_s"], "peak_memory_mb": r["peak_memory_mb"]}))
"""


def run(loop: str, recipe: Path, warmup: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if loop == "fewstep":
        cmd = [sys.executable, "-c", FEWSTEP, str(recipe), str(warmup), str(steps)]
    else:
        cmd = [sys.executable, str(ROOT / "examples" / "hand_cd_loop.py"), "--warmup", str(warmup), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits" / "cd.yaml")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pairs = []
    for i in range(args.pairs):
        order = ("fewstep", "hand") if i % 2 == 0 else ("hand", "fewstep")
        res = {loop: run(loop, args.recipe, args.warmup, args.steps) for loop in order}
        pair = {"time_ratio": res["fewstep"]["step_s"] / res["hand"]["step_s"],
                "memory_ratio": res["fewstep"]["peak_memory_mb"] / res["hand"]["peak_memory_mb"], **{
                    f"{k}_{m}": res[k][m] for k in res for m in ("step_s", "peak_memory_mb")}}
        pairs.append(pair)
        print(json.dumps({"pair": i, **pair}), flush=True)
    summary = {"pairs": len(pairs), "steps": args.steps, "warmup": args.warmup,
               "median_time_ratio": statistics.median(p["time_ratio"] for p in pairs),
               "median_memory_ratio": statistics.median(p["memory_ratio"] for p in pairs),
               "median_fewstep_step_s": statistics.median(p["fewstep_step_s"] for p in pairs),
               "median_hand_step_s": statistics.median(p["hand_step_s"] for p in pairs)}
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "pairs": pairs}, indent=2))


if __name__ == "__main__":
    main()
