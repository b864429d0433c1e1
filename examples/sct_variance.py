"""SCT's variance reduction, measured on a real run: the spread of the training gradient with SCT's stable
target and with ECT's conditional one, on the same batch stream (consistency.md §5.2).

    python examples/sct_variance.py runs/fashion-sct --batches 32

The run's student (its latest checkpoint, in training mode) is held fixed. For each of ``--batches``
consecutive batches of the run's own data and noise stream (the images, z and t the trainer would draw at
that point of training), the loss gradient is computed twice: with ``stable_target`` on (SCT) and off (ECT,
the same recipe otherwise). Reported per variant: the mean loss, the squared norm of the mean gradient and
the gradient variance E||g_i - mean g||² (the trace of the covariance over batches); their ratio is the
variance reduction. Writes RUN/variance.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def gradients(trainer, pm, stable: bool, batches: int, start_nimg: int) -> tuple[torch.Tensor, list[float]]:
    """(batches, P) flattened student gradients of the mean loss, and the losses, on the run's stream."""
    ctx = dataclasses.replace(trainer.ctx, method=trainer.ctx.method.model_copy(update={"stable_target": stable}))
    group = trainer.groups["student"]
    student = trainer.nets.student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    rows, losses = [], []
    for k in range(batches):
        trainer.state.nimg = start_nimg + k * trainer.global_batch
        batch, info = trainer.batch(0), trainer.step_info(0, group)
        torch.manual_seed(k)  # the same dropout masks for both variants
        out = pm.hook.fewstep_loss(ctx=ctx, group=group, batch=batch, nets=trainer.nets, step=info)
        loss = out.loss.mean()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.flatten() for g in grads]))
        losses.append(float(loss.detach()))
    return torch.stack(rows), losses


def summary(g: torch.Tensor, losses: list[float]) -> dict[str, float]:
    mean = g.mean(0)
    return {"loss": sum(losses) / len(losses), "mean_grad_sq_norm": float(mean.square().sum()),
            "grad_variance": float((g - mean).square().sum(1).mean())}


def main() -> None:
    from fewstep.cli import _built_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an `sct` (or `ect`) run folder")
    parser.add_argument("--batches", type=int, default=32, help="batches of the stream (default 32)")
    parser.add_argument("--at-nimg", type=int, default=None, help="where in the stream to start (default: the "
                        "run's end, so the curriculum stage is the final one)")
    args = parser.parse_args()
    trainer, pm = _built_run(args.run)
    if trainer.ctx.method.name != "sct":
        raise SystemExit(f"{args.run} is a {trainer.ctx.method.name!r} run; give an `sct` run (its config has "
                         "the stable_target switch)")
    start = args.at_nimg if args.at_nimg is not None else trainer.state.nimg
    result = {"run": str(args.run), "batches": args.batches, "batch_size": trainer.global_batch, "at_nimg": start}
    for name, stable in (("ect_target", False), ("sct_stable_target", True)):
        result[name] = summary(*gradients(trainer, pm, stable, args.batches, start))
    result["variance_ratio"] = result["sct_stable_target"]["grad_variance"] / result["ect_target"]["grad_variance"]
    (args.run / "variance.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
