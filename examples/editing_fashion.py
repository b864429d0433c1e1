"""Editing benchmark of a consistency-type student (docs/EDITING.md): PSNR of the known part and FID of completions.

    python examples/editing_fashion.py runs/fashion-ctm runs/fashion-ctm/editing --num 1000 --steps 2

The first NUM images of --data (default: the Fashion-MNIST test split, its labels as the class condition, as
`fewstep eval` does) go through fewstep.editing.benchmark_edits, the code `fewstep edit` runs: inpainting with
the middle half of the rows unknown, FACTOR x FACTOR super-resolution, and SDEdit at STRENGTH from the block
image. Per task: the PSNR of the known part (inpaint: the known pixels; superres: the output's block averages
against the input's; sdedit has none), the mean per-image PSNR of the output against the original, and FID /
precision / recall of the NUM outputs, and of the degraded inputs themselves, against the NUM originals, with
the features and cached reference statistics of `fewstep eval` (fewstep.evaluation; the originals are its
reference when --data is the eval reference and --num its num). Writes OUT_DIR/editing.json and
OUT_DIR/editing.png (the first 8 images: originals, mask, each task's input and output).
RUN is a run folder or an export; --data any image source fewstep reads, shaped like the student's images.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

FASHION_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def known_part(task: str, output: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
               factor: int) -> dict[str, float | str] | None:
    """Agreement of the output with the observation through the task's projection (fewstep.editing.operator):
    inpaint over the known pixels, superres over the factor x factor block averages; None for tasks that fix
    nothing. PSNR as ``fewstep edit`` prints it ("inf" for an exact match: JSON has no infinity)."""
    from fewstep.editing import known_psnr, operator

    if task not in ("inpaint", "superres"):
        return None
    op, _ = operator(task, original, mask, factor)
    psnr = known_psnr(output, original, op)
    diff = op.project(output) - op.project(original)
    return {"psnr_db": "inf" if math.isinf(psnr) else psnr, "max_abs_error": float(diff.abs().max())}


def run_benchmark(student: Path, out_dir: Path, *, data: str = FASHION_TEST, num: int = 1000, steps: int = 2,
                  tasks: tuple[str, ...] = ("inpaint", "superres", "sdedit"), factor: int = 4, strength: float = 0.5,
                  batch: int = 250, seed: int = 0, features: Path | None = None) -> dict[str, object]:
    from fewstep.editing import benchmark_edits, benchmark_grid_rows, load_student, middle_rows_mask
    from fewstep.evaluation import (
        FeatureExtractor,
        compare_features,
        coupling_preservation,
        reference_features,
        rows_cond,
        source_dataset,
    )
    from fewstep.images import save_grid_rows

    hook, ctx, nets = load_student(student)
    teacher = nets.teacher
    dataset = source_dataset(ctx.config.data, teacher, data)
    if not dataset.has_images:
        raise ValueError(f"--data {data!r} has no images to edit")
    if not 8 <= num <= len(dataset):  # 8: the grid's columns; FID needs a few samples anyway
        raise ValueError(f"--num must be in [8, {len(dataset)}] (the images of {data!r}), got {num}")
    images, labels, prompts = dataset.get(torch.arange(num))
    if teacher.conditioning == "class" and labels is None:
        raise ValueError(f"the student is class-conditional but --data {data!r} has no labels (an idx file needs "
                         "its labels file next to it, e.g. t10k-labels-idx1-ubyte.gz)")

    given: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    outputs: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    start = time.perf_counter()
    for lo in range(0, num, batch):
        rows = slice(lo, lo + batch)
        edits = benchmark_edits(hook, ctx, nets, images[rows], steps, tasks=tasks, factor=factor, strength=strength,
                                cond=rows_cond(teacher, labels, prompts, rows, num, ctx.device), seed=seed + lo)
        for task, (x, y) in edits.items():
            given[task].append(x.cpu())
            outputs[task].append(y.cpu())
        print(f"edited {min(lo + batch, num)}/{num} images ({time.perf_counter() - start:.0f} s)", flush=True)
    edit_seconds = time.perf_counter() - start
    given_all = {t: torch.cat(v) for t, v in given.items()}
    out_all = {t: torch.cat(v) for t, v in outputs.items()}

    extractor = FeatureExtractor(features, device=ctx.device)
    real, _ = reference_features(dataset, data, num, extractor)
    mask = middle_rows_mask(images.shape[-1])
    input_features: dict[str, object] = {}  # sdedit's input is superres's block image: its features once
    results: dict[str, object] = {
        "student": str(student), "data": data, "reference": dataset.describe(), "num": num, "steps": steps,
        "factor": factor, "strength": strength, "seed": seed, "features": str(extractor.path),
        "edit_seconds": round(edit_seconds, 1), "tasks": {}}
    for task in tasks:
        key = "superres" if task == "sdedit" and "superres" in given_all else task
        if key not in input_features:
            input_features[key] = extractor(given_all[task])
        results["tasks"][task] = {
            "known_part": known_part(task, out_all[task], images, mask, factor),
            "whole_vs_original": coupling_preservation(out_all[task], images),
            "output": compare_features(real, extractor(out_all[task])),
            "input": compare_features(real, input_features[key]),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "editing.json").write_text(json.dumps(results, indent=2) + "\n")
    shown = {t: (given_all[t][:8], out_all[t][:8]) for t in tasks}
    save_grid_rows(benchmark_grid_rows(images[:8], shown), out_dir / "editing.png", upscale=4)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder or an export of a consistency-type student")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", default=FASHION_TEST, help=f"images to edit and compare with (default {FASHION_TEST})")
    parser.add_argument("--num", type=int, default=1000, help="the first NUM images of --data (default 1000, as eval)")
    parser.add_argument("--steps", type=int, default=2, help="consistency steps per edit (default 2)")
    parser.add_argument("--tasks", nargs="+", default=["inpaint", "superres", "sdedit"],
                        choices=["inpaint", "superres", "sdedit"])
    parser.add_argument("--factor", type=int, default=4, help="super-resolution block size (default 4: 16x16 from 4x4)")
    parser.add_argument("--strength", type=float, default=0.5, help="sdedit start level (default 0.5)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", type=Path, default=None,
                        help="TorchScript feature network (default: the FID Inception-v3 of `fewstep eval`)")
    args = parser.parse_args(argv)
    r = run_benchmark(args.run, args.out_dir, data=args.data, num=args.num, steps=args.steps, tasks=tuple(args.tasks),
                      factor=args.factor, strength=args.strength, batch=args.batch, seed=args.seed,
                      features=args.features)
    print(f"{'task':<9} {'known PSNR':>10} {'whole PSNR':>10} {'FID out':>8} {'FID in':>8}   "
          f"(n={r['num']}, {r['steps']} steps, {r['edit_seconds']} s editing)")
    for task, m in r["tasks"].items():
        known = m["known_part"]["psnr_db"] if m["known_part"] else "-"
        known = f"{known:.2f}" if isinstance(known, float) else known
        print(f"{task:<9} {known:>10} {m['whole_vs_original']['psnr']:>10.2f} {m['output']['fid']:>8.2f} "
              f"{m['input']['fid']:>8.2f}")
    print(f"wrote {args.out_dir / 'editing.json'} and {args.out_dir / 'editing.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
