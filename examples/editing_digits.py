"""Zero-shot editing grid of a digits consistency student (docs/EDITING.md): inpainting, super-resolution,
stroke-guided generation (SDEdit) and interpolation, with the PSNR of the known part.

    fewstep distill recipes/digits/cd.yaml --set train.total_nimg=4000 --run-dir /tmp/cd-edit
    python examples/editing_digits.py /tmp/cd-edit docs/editing/digits-cd.png

Colorization needs RGB images; the digits are grey, so it is not in this grid (tests/test_editing.py covers it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fewstep.cli import _built_run
from fewstep.editing import (
    BlockAverage,
    Everything,
    Mask,
    benchmark_edits,
    benchmark_grid_rows,
    edit,
    known_psnr,
    middle_rows_mask,
)
from fewstep.images import save_grid_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=8, help="images (the last NUM of the digits set)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    trainer, pm = _built_run(args.run)
    hook, ctx, nets = pm.hook, trainer.ctx, trainer.nets
    n = len(trainer.dataset)
    images, _, _ = trainer.dataset.get(torch.arange(n - args.num, n))
    edits = benchmark_edits(hook, ctx, nets, images, args.steps, factor=4, strength=0.5, seed=0)
    ops = {"inpaint": Mask(middle_rows_mask(images.shape[-1])), "superres": BlockAverage(4)}
    for task, op in ops.items():
        out = edits[task][1]
        psnr = known_psnr(out, images, op)
        full = known_psnr(out, images, Everything())
        print(f"{task}: PSNR of the known part {psnr:.2f} dB; of the whole image vs the original {full:.2f} dB")
    rows = benchmark_grid_rows(images, edits)
    rows["interpolation"] = edit(hook, ctx, nets, "interpolate", images, args.steps, num_frames=args.num,
                                 generator=torch.Generator().manual_seed(1))
    save_grid_rows(rows, args.out, upscale=4)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
