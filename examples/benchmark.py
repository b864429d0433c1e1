"""The Fashion-MNIST benchmark of docs/BENCHMARKS.md, end to end, with one command.

    python examples/benchmark.py                       # everything that is missing, in order
    python examples/benchmark.py --only cd ct ict      # some rows
    python examples/benchmark.py --list                # what it would run

Steps (each skipped when its output already exists, so an interrupted benchmark resumes):
1. the teacher: `fewstep train recipes/fashion/teacher.yaml --run-dir runs/fashion-teacher` (resumed from its
   checkpoints when interrupted);
2. the weak teacher for autoguidance: `fewstep export runs/fashion-teacher runs/fashion-teacher-75k
   --checkpoint 75008` (the teacher after 1/8 of its training);
3. the pair stores: `fewstep pairs runs/fashion-teacher/export runs/fashion-pairs --num 10000 --steps 16`
   (DMD's regression, CAF, reflow) and a held-out one with `--num 1000 --seed 1` (coupling preservation);
4. the floor of the FID: 1000 training images against the reference (examples/real_data_fid.py);
5. every recipe `recipes/fashion/<name>.yaml` into `runs/fashion-<name>`, then `fewstep eval` with one
   protocol for all rows (1000 samples against the first 1000 test images, the student at the recipe's
   eval.steps, 1/2/4 or the generator's own step counts, the teacher at 32 Heun steps), and `fewstep
   coupling` on the held-out pairs for the deterministic samplers (CAF, reflow);
6. `fewstep compare` of every evaluated row into docs/benchmarks/fashion/compare.md and .png.

Needs `apt-get install dataset-fashion-mnist` and `pip install '.[eval]'` (see ../shared/data/README.md).
Every command runs with one CPU thread (OMP_NUM_THREADS=1), the fastest setting on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
REFERENCE = DATA / "t10k-images-idx3-ubyte.gz"
TEACHER_RUN = ROOT / "runs" / "fashion-teacher"
TEACHER = TEACHER_RUN / "export"
WEAK = ROOT / "runs" / "fashion-teacher-75k"
PAIRS = ROOT / "runs" / "fashion-pairs"
HELD_OUT = ROOT / "runs" / "fashion-pairs-heldout"
OUT = ROOT / "docs" / "benchmarks" / "fashion"
# Benchmark rows in the order of docs/BENCHMARKS.md; a row whose recipe is missing is skipped with a note.
ROWS = ["cd", "ct", "ict", "ect", "sct", "scm", "ctm", "flowmap", "dmd", "dmd2", "dmd2-4step", "msd", "guided", "caf",
        "reflow", "kd", "fdistill", "ladd", "add", "meanflow", "tcm", "pcm"]
COUPLING = {"caf", "reflow"}  # deterministic samplers of the teacher's couplings
EVAL = ["--num", "1000", "--teacher-steps", "32", "--reference", str(REFERENCE)]  # steps: the recipe's eval.steps


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"  ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)


def fewstep(*args: str) -> list[str]:
    return [sys.executable, "-m", "fewstep.cli", *args]


def finished(run_dir: Path) -> bool:
    """Whether a run trained to its recipe's length (summary.json with nimg >= total_nimg)."""
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return False
    import yaml

    total = yaml.safe_load(config.read_text())["train"]["total_nimg"]
    return json.loads(summary.read_text()).get("nimg", 0) >= total


def evaluated(run_dir: Path) -> bool:
    """Whether the run holds an evaluation under this benchmark's protocol, at its recipe's eval.steps."""
    path, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not (path.is_file() and config.is_file()):
        return False
    import yaml

    steps = (yaml.safe_load(config.read_text()).get("eval") or {}).get("steps") or [1, 2, 4]
    e = json.loads(path.read_text()).get("eval", {})
    return e.get("num") == 1000 and "teacher 32 steps" in e and all(
        f"student {k} step{'s' if k > 1 else ''}" in e for k in steps) and "t10k" in str(e.get("reference"))


def train(recipe: Path, run_dir: Path, seed: int = 0) -> None:
    resume = ["--resume"] if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) else []
    run(fewstep("distill", str(recipe), "--run-dir", str(run_dir), "--set", "train.progress_bar=false",
                "--set", f"train.seed={seed}", *resume))


def run_dir_of(name: str, seed: int) -> Path:
    """runs/fashion-NAME for training seed 0 (the rows of earlier rounds), runs/fashion-NAME-seedS otherwise."""
    return ROOT / "runs" / (f"fashion-{name}" if seed == 0 else f"fashion-{name}-seed{seed}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=ROWS, help="benchmark rows to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--seed", type=int, default=0, help="training seed (train.seed); rows of seed S > 0 go to "
                        "runs/fashion-NAME-seedS, so two seeds can train side by side once the teacher and pairs exist")
    parser.add_argument("--prepare-only", action="store_true", help="make the teacher, weak teacher, pair stores and "
                        "real-data row, then stop (run this once before launching several seeds in parallel)")
    parser.add_argument("--no-compare", action="store_true", help="skip the final `fewstep compare`")
    args = parser.parse_args()
    rows = args.only or ROWS
    if args.list:
        for name in rows:
            recipe = ROOT / "recipes" / "fashion" / f"{name}.yaml"
            state = "done" if evaluated(run_dir_of(name, args.seed)) else "to run"
            print(f"{name:<10} {recipe.relative_to(ROOT) if recipe.is_file() else '(no recipe)'}  {state}")
        return 0
    if not REFERENCE.is_file():
        print(f"Fashion-MNIST is missing ({REFERENCE}): apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    if not (TEACHER / "model_index.json").is_file():
        train(ROOT / "recipes" / "fashion" / "teacher.yaml", TEACHER_RUN)
    if not (WEAK / "model_index.json").is_file():
        run(fewstep("export", str(TEACHER_RUN), str(WEAK), "--checkpoint", "75008"))
    for store, extra in ((PAIRS, ["--num", "10000"]), (HELD_OUT, ["--num", "1000", "--seed", "1"])):
        manifest = store / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["num"] < int(extra[1]):
            run(fewstep("pairs", str(TEACHER), str(store), "--steps", "16", *extra))
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "real.json").is_file():
        with open(OUT / "real.json", "w") as fh:
            print("+ examples/real_data_fid.py (-> real.json)", flush=True)
            subprocess.run([sys.executable, str(ROOT / "examples" / "real_data_fid.py"), str(DATA / "train-images-idx3-ubyte.gz"),
                            str(REFERENCE), "--num", "1000"], check=True, cwd=ROOT, stdout=fh,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if args.prepare_only:
        return 0
    done = []
    for name in rows:
        recipe = ROOT / "recipes" / "fashion" / f"{name}.yaml"
        if not recipe.is_file():
            print(f"skip {name}: no recipe {recipe}")
            continue
        run_dir = run_dir_of(name, args.seed)
        if not finished(run_dir):
            train(recipe, run_dir, args.seed)
        if not evaluated(run_dir):
            run(fewstep("eval", str(run_dir), *EVAL))
        if name in COUPLING and "coupling" not in json.loads((run_dir / "summary.json").read_text()):
            run(fewstep("coupling", str(run_dir), str(HELD_OUT), "--steps", "1", "2", "4", "--num", "1000"))
        done.append(run_dir)
    if done and not args.no_compare:
        run(fewstep("compare", *map(str, done), "--out", str(OUT)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
