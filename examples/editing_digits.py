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
from fewstep.editing import BlockAverage, Everything, Mask, degraded_view, edit, known_psnr
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
    size = images.shape[-1]
    mask = torch.ones(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, :] = 0  # the middle half of the rows is unknown
    rows: dict[str, torch.Tensor] = {"original": images, "inpaint mask": (mask - 1).expand_as(images)}  # grey = known
    for task, op, kw in (("inpaint", Mask(mask), {"mask": mask}), ("superres", BlockAverage(4), {"factor": 4})):
        g = torch.Generator().manual_seed(0)
        out = edit(hook, ctx, nets, task, images, args.steps, generator=g, **kw)
        rows[f"{task} input"] = degraded_view(task, images, kw.get("mask"), kw.get("factor", 2))
        rows[f"{task} output"] = out
        psnr = known_psnr(out, images, op)
        full = known_psnr(out, images, Everything())
        print(f"{task}: PSNR of the known part {psnr:.2f} dB; of the whole image vs the original {full:.2f} dB")
    strokes = BlockAverage(4).project(images).clamp(-1, 1)
    rows["sdedit input"] = strokes
    rows["sdedit output"] = edit(hook, ctx, nets, "sdedit", strokes, args.steps, strength=0.5,
                                 generator=torch.Generator().manual_seed(0))
    rows["interpolation"] = edit(hook, ctx, nets, "interpolate", images, args.steps, num_frames=args.num,
                                 generator=torch.Generator().manual_seed(1))
    save_grid_rows(rows, args.out, upscale=4)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
