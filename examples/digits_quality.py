"""Rough sample-quality numbers for a digits run, without any downloaded feature network.

A logistic-regression classifier is fitted on the real 8x8 digits (0.961 held-out accuracy).
Samples of the teacher and of the student (1, 2, ... steps) from the same noise are average-pooled
to 8x8 and classified. Reported per row:
  confident   fraction of samples the classifier labels with probability > 0.9 (real test digits: 0.663)
  agree       fraction whose label equals the teacher's label for the same noise
  classes     number of the 10 classes that appear among the labels (mode coverage)
  hf          high-frequency energy (the image minus its 3x3 local mean, squared, averaged) relative to the
              teacher row's: speckled samples (pixel noise) score well above 1, blurry ones below 1 (the real
              digits are 8x8 upscaled, so their blocky edges are no reference)
`fewstep eval RUN` gives FID / precision / recall; these numbers are a sanity check.

Usage: python examples/digits_quality.py RUN [--num 512] [--steps 1 2] [--teacher-steps 32]
       [--set method.sample_sigmas={2:[80,1.5]}] (recipe overrides, e.g. another sampler on the same weights)
       [--teacher-solves] (also the teacher's own solve along CD grids: the fixed point a CD student approaches)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def fit_classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.3, random_state=0)
    clf = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    real_conf = float((clf.predict_proba(x_te).max(1) > 0.9).mean())
    return clf, float(clf.score(x_te, y_te)), real_conf


def classify(clf, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """images: (N, 1, H, W) in [-1, 1] -> labels (N,), max probability (N,)."""
    small = F.adaptive_avg_pool2d(images.float().clamp(-1, 1), 8)
    x = ((small + 1) / 2).flatten(1).numpy()
    proba = clf.predict_proba(x)
    return proba.argmax(1), proba.max(1)


def high_frequency(images: torch.Tensor) -> float:
    """Mean squared difference between images (N, 1, H, W) in [-1, 1] and their 3x3 local mean (edges replicated)."""
    x = images.float().clamp(-1, 1)
    local = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float((x - local).square().mean())


@torch.no_grad()
def teacher_solve(teacher, num_scales: int, solver: str, substeps: int, noise: torch.Tensor) -> torch.Tensor:
    """The teacher's ODE solve from 80 * noise along a CD grid with the cm plugin's own teacher step: the target
    chain a CD student with these settings converges to. Returns images (N, C, H, W)."""
    from fewstep_plugins import cm

    from fewstep.types import Batch, Cond

    cfg = cm.CDConfig(num_scales=num_scales, solver=solver, substeps=substeps, sigma_max=80.0)
    grid = cm.cd_grid(cfg, teacher.process)
    x, batch, b = noise * grid[0], Batch(x0=None, cond=Cond()), noise.shape[0]
    for hi, lo in zip(grid[:-1], grid[1:]):
        x = cm.teacher_step(teacher, cfg, batch, x, hi.expand(b), lo.expand(b), None)
    return teacher.decode(x).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-solves", action="store_true",
                   help="add rows for the teacher's solve along 6/11/18-point CD grids (Euler or Heun, 1 or 2 "
                        "substeps per interval, sigma_max 80): a CD student converges to these")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe before sampling (repeatable)")
    args = p.parse_args()

    from fewstep.config import load_config
    from fewstep.plugin import build_manager
    from fewstep.sampling import generate
    from fewstep.trainer import Trainer

    config = load_config(args.run / "config.yaml", ["train.progress_bar=false", *args.set])
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
    trainer = Trainer(config, pm, args.run, resume=True)
    trainer.setup()
    teacher = trainer.nets.teacher
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *teacher.sample_shape), generator=g)

    clf, acc, real_conf = fit_classifier()
    print(f"classifier held-out accuracy {acc:.3f}; real test digits confident {real_conf:.3f}")
    with torch.no_grad():
        t_images = teacher.sample(noise, None, num_steps=args.teacher_steps, solver="heun").float()
    t_labels, t_prob = classify(clf, t_images)
    t_hf = high_frequency(t_images)
    rows = {f"teacher {args.teacher_steps} steps": (t_labels, t_prob, 1.0)}
    for k in args.steps:
        images = generate(pm.hook, trainer.ctx, trainer.nets, noise, None, k, seed=args.seed + k)
        rows[f"student {k} step{'s' if k > 1 else ''}"] = (*classify(clf, images), high_frequency(images) / t_hf)
    if args.teacher_solves:
        for n, solver, substeps in [(6, "euler", 1), (6, "heun", 1), (6, "euler", 2), (6, "heun", 2), (11, "heun", 1),
                                    (18, "euler", 1), (18, "heun", 1)]:
            images = teacher_solve(teacher, n, solver, substeps, noise)
            rows[f"CD grid {n} {solver} x{substeps}"] = (*classify(clf, images), high_frequency(images) / t_hf)
    print(f"{'row':<22} {'confident':>9} {'agree':>6} {'classes':>7} {'hf':>5}")
    for name, (labels, prob, hf) in rows.items():
        print(f"{name:<22} {(prob > 0.9).mean():>9.3f} {(labels == t_labels).mean():>6.3f} "
              f"{len(set(labels.tolist())):>7} {hf:>5.2f}")


if __name__ == "__main__":
    main()
