"""Which step of a multistep DMD2 generator costs its FID: the chain cut after its first K levels, and finished
by the generator, the teacher's one-step x0 or the teacher's ODE (issue 14, round 17).

    python examples/dmd2_chain_probe.py runs/dmd24e-s0 3 3+generator 3+teacher 3+ode \
        --reference /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

Rows, for a run with N trained generator levels l_0 > ... > l_{N-1} (``Schedule.levels``):
- ``K``: the generator's sampler on the first K levels l_0..l_{K-1} (``few_step_sample``; K = N is the N-step
  row of ``fewstep eval``; K < N is not ``fewstep eval --steps K``, which takes an evenly spread subset);
- ``K+generator``: K generator steps, re-noised with fresh noise to l_K, then the generator at l_K; for K = N - 1
  this is the N-step sampler itself, draw for draw (a check of the probe);
- ``K+teacher``: the same, with the teacher's x0 prediction at l_K in place of the generator's;
- ``K+ode``: the same, then the teacher's Euler ODE from l_K to 0 in ``--ode-steps`` steps.

Every row starts from the same noise (seed 0, as ``fewstep eval``), with the reference images' labels as
classes, the sampler's fresh noise from a generator seeded with ``--seed``, the run's evaluation EMA and the
teacher at the run's ``teacher.guidance``; FID / precision / recall against ``--num`` reference images with
the run's feature network (``evaluation.compare_features``). Writes RUN/chain_probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor


def parse_row(row: str, num_levels: int) -> tuple[int, str | None]:
    """``"K"`` or ``"K+TAIL"`` -> (K, TAIL or None), checked against the run's N levels."""
    first, _, tail = row.partition("+")
    if not first.isdigit() or tail not in ("", "generator", "teacher", "ode"):
        raise ValueError(f"row {row!r}: write K or K+generator, K+teacher, K+ode (K a number of levels)")
    k = int(first)
    if not 1 <= k <= num_levels or (tail and k == num_levels):
        limit = f"1..{num_levels}" if not tail else f"1..{num_levels - 1} (a tail needs a level left)"
        raise ValueError(f"row {row!r}: K must be in {limit} for this run's {num_levels} generator levels")
    return k, tail or None


@torch.no_grad()
def chain(trainer, noise: Tensor, cond, first: int, tail: str | None, rng: torch.Generator,
          ode_steps: int = 8) -> Tensor:
    """x0 samples (B, C, H, W, model space) of one probe row (see the module docstring); ``rng`` draws the
    sampler's fresh noise in the order ``few_step_sample`` does, then the tail's re-noising."""
    from fewstep.distribution import Schedule, denoiser, few_step_sample
    from fewstep.sampling import sampling_net

    nets, cfg = trainer.nets, trainer.ctx.method
    teacher = nets.teacher
    process = teacher.process.for_sampler()
    levels = Schedule.of(cfg, process).levels
    generator = denoiser(process, sampling_net(nets), cond)
    x0 = few_step_sample(generator, noise, levels[:first], rng)
    if tail is None:
        return x0
    s = levels[first].to(noise.device)
    x = x0 + s * torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(x0.device)

    def teacher_x0(x: Tensor, sigma: Tensor) -> Tensor:
        return teacher.denoise(x, sigma.expand(x.shape[0]), cond, guidance=trainer.config.teacher.guidance).float()

    if tail == "generator":
        return generator(x, s.expand(x.shape[0])).float()
    if tail == "teacher":
        return teacher_x0(x, s)
    sigmas = torch.linspace(float(s), 0.0, ode_steps + 1, dtype=torch.float64)
    for a, b in zip(sigmas[:-1], sigmas[1:]):  # Euler on dx/dsigma = (x - D(x, sigma)) / sigma
        x = x + float(b - a) * (x - teacher_x0(x, a.float().to(x.device))) / float(a)
    return x


def main() -> None:
    from fewstep.cli import _built_run
    from fewstep.distribution import Schedule
    from fewstep.evaluation import (
        FeatureExtractor,
        compare_features,
        reference_features,
        reference_set,
        rows_cond,
    )
    from fewstep.sampling import eval_mode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `dmd2` run folder with num_steps > 1")
    parser.add_argument("rows", nargs="+", help="K, K+generator, K+teacher or K+ode (see above)")
    parser.add_argument("--reference", default="data", help="real images (default: the run's training data)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--ode-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=4, help="the sampler's fresh noise (fewstep eval: 0 + steps)")
    args = parser.parse_args()

    trainer, _ = _built_run(args.run)
    cfg = trainer.ctx.method
    if cfg.name != "dmd2" or cfg.num_steps < 2:
        raise SystemExit(f"{args.run}: give a `dmd2` run with num_steps > 1 (this one: {cfg.name}, "
                         f"num_steps {getattr(cfg, 'num_steps', 1)})")
    nets, teacher = trainer.nets, trainer.nets.teacher
    levels = Schedule.of(cfg, teacher.process).levels
    rows = {row: parse_row(row, levels.numel()) for row in args.rows}  # every row checked before any work
    dataset, source = reference_set(trainer, args.reference)
    num = min(args.num, len(dataset))
    _, labels, prompts = dataset.get(torch.arange(num))
    extractor = FeatureExtractor(trainer.config.eval.features, device=trainer.ctx.device)
    real, _ = reference_features(dataset, source, num, extractor)
    noise = torch.randn((num, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    device = trainer.ctx.device
    results: dict[str, object] = {"levels": levels.tolist(), "num": num, "reference": dataset.describe()}
    for row, (first, tail) in rows.items():
        rng, chunks = torch.Generator().manual_seed(args.seed), []
        with eval_mode(*[nets.get(n) for n in nets.names()]):
            for lo in range(0, num, 100):
                cond = rows_cond(teacher, labels, prompts, slice(lo, lo + 100), num, device)
                x0 = chain(trainer, noise[lo:lo + 100].to(device), cond, first, tail, rng, args.ode_steps)
                chunks.append(teacher.decode(x0).float().cpu())
        results[row] = compare_features(real, extractor(torch.cat(chunks), f"features: {row}"))
        print(row, json.dumps(results[row]), flush=True)
    (args.run / "chain_probe.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
