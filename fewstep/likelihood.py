"""Likelihood by the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
§4.3 and Appendix D.2), for any denoiser D(x, sigma) in sigma space: a diffusion teacher, or a CTM student
through its score model g(x, t, t) (hook ``fewstep_score_denoiser``; Kim et al. 2023, §4).

In sigma space (x = x0 + sigma eps, ``fewstep.diffusion``) the PF-ODE is dx/dsigma = (x - D(x, sigma)) / sigma,
and with u = ln sigma it is dx/du = x - D(x, e^u). The instantaneous change of variables,
d/du log p(x(u)) = -div_x(x - D) = -(d - div_x D), integrated from sigma_min (the data) to sigma_max gives

    log p(x0) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{ln sigma_min}^{ln sigma_max} (d - div_x D) du,

with the prior N(0, sigma_max^2 I) for p at sigma_max (its error is O(Var(data) / sigma_max^2) per
dimension, below 1e-4 nats for data in [-1, 1] at sigma_max = 80). The ODE and the integral are solved
together with Heun's method on a grid uniform in ln sigma. The divergence is exact (d reverse-mode passes,
for small images and tests) or Hutchinson's estimator div D = E_v[v^T (dD/dx) v] with one Rademacher or
Gaussian probe v per image, fixed for the whole trajectory (Grathwohl et al. 2019, FFJORD), from a seeded
generator: unbiased for log p, with a variance that shrinks as 1/d per dimension.

Bits per dimension of 8-bit data scaled to [-1, 1] (bin width 2/256): with uniform dequantisation
(x + u, u ~ U[0, 2/256)) the discrete log-likelihood is at least E_u log p(x + u) + d ln(2/256), so

    bits/dim = -log p(x) / (d ln 2) + log2(128) = -log p(x) / (d ln 2) + 7.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,H,W), sigma (B,)) -> x0 estimate, differentiable in x
Probe = Literal["rademacher", "gaussian", "exact"]

BITS_OFFSET_8BIT = 7.0  # log2(128): 256 levels over [-1, 1], bin width 1/128


@dataclass(frozen=True)
class LikelihoodResult:
    """Per image (B,): log p(x0) in nats; the prior term and the integrated divergence that make it up."""

    log_p: Tensor
    prior: Tensor
    delta: Tensor

    def bits_per_dim(self, dims: int, dequantized_8bit: bool = True) -> Tensor:
        """-log p / (d ln 2), plus log2(128) for 8-bit data scaled to [-1, 1] (see the module docstring)."""
        bpd = -self.log_p / (dims * math.log(2.0))
        return bpd + BITS_OFFSET_8BIT if dequantized_8bit else bpd


def divergence(den: Denoiser, x: Tensor, sigma: Tensor, probe: Probe, v: Tensor | None) -> tuple[Tensor, Tensor]:
    """(D(x, sigma) detached, div_x D per sample (B,)): exact (one reverse pass per dimension) or
    v^T (dD/dx) v for the probe ``v`` (B, C, H, W)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = den(x, sigma)
        if probe == "exact":
            flat = out.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < flat.shape[1] - 1)
                div = div + row.flatten(1)[:, i]
        else:
            (jtv,) = torch.autograd.grad((out * v).sum(), x)
            div = (jtv * v).flatten(1).sum(1)
    return out.detach(), div.detach()


def draw_probe(shape: torch.Size, probe: Probe, generator: torch.Generator) -> Tensor | None:
    """One probe per image: Rademacher (+-1) or standard Gaussian; None for the exact divergence."""
    if probe == "exact":
        return None
    if probe == "gaussian":
        return torch.randn(shape, generator=generator)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def log_likelihood(den: Denoiser, x0: Tensor, sigma_min: float, sigma_max: float, num_steps: int = 64,
                   probe: Probe = "rademacher", generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p(x0) (nats, per image) by the PF-ODE from sigma_min to sigma_max with ``num_steps`` Heun steps
    uniform in ln sigma. x0: (B, C, H, W) in model space; den: sigma-space denoiser, differentiable in x."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"likelihood: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    v = draw_probe(x0.shape, probe, generator)
    v = None if v is None else v.to(x0.device, x0.dtype)
    dims = x0[0].numel()
    us = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_steps + 1).tolist()

    def evaluate(x: Tensor, u: float) -> tuple[Tensor, Tensor]:
        sigma = torch.full((x.shape[0],), math.exp(u), device=x.device, dtype=x.dtype)
        d, div = divergence(den, x, sigma, probe, v)
        return (x - d) / math.exp(u), dims - div  # dx/dsigma, d(delta)/du

    # x steps in sigma (Heun as EDM's sampler: exact where D is locally constant, which the growing noise
    # part is); delta steps in u (its integrand tends to the constant d, which the trapezoid rule integrates
    # exactly). Both from the same two evaluations per step.
    x, delta = x0.detach().clone(), torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    slope, dl = evaluate(x, us[0])
    for u, u_next in zip(us, us[1:]):
        ds, h = math.exp(u_next) - math.exp(u), u_next - u
        slope_e, dl_e = evaluate(x + ds * slope, u_next)
        x, delta = x + ds / 2 * (slope + slope_e), delta + h / 2 * (dl + dl_e)
        slope, dl = evaluate(x, u_next) if u_next != us[-1] else (slope_e, dl_e)
    prior = -0.5 * (x.flatten(1).pow(2).sum(1) / sigma_max**2 + dims * math.log(2 * math.pi * sigma_max**2))
    return LikelihoodResult(log_p=prior + delta, prior=prior, delta=delta)


def teacher_denoiser(teacher: Any, cond: Any = None) -> Denoiser:
    """A teacher's sigma-space denoiser, differentiable in x (``Teacher.denoise`` runs under no_grad)."""
    if teacher.net.self_conditioning:
        raise ValueError("likelihood: a self-conditioned teacher's denoiser reads its own estimate, so it is not a "
                         "function of x alone; the PF-ODE likelihood is not defined for it here")

    def den(x: Tensor, sigma: Tensor) -> Tensor:
        return teacher.process.denoise(teacher.net, x.to(teacher.dtype), sigma, cond).to(x.dtype)

    return den


def cmd_likelihood(args: Any) -> int:
    """``fewstep likelihood RUN|TEACHER --data SOURCE --num N``: bits/dim of the last N images of the source."""
    import json

    if (args.model / "config.yaml").is_file():
        from fewstep.cli import _built_run

        trainer, pm = _built_run(args.model)
        nets, ctx = trainer.nets, trainer.ctx
        teacher, data_config = nets.teacher, trainer.config.data
        if not args.teacher and pm.hook.fewstep_score_denoiser(ctx=ctx, nets=nets, cond=None) is None:
            raise ValueError(f"method {ctx.method.name!r} gives no score model (hook fewstep_score_denoiser); "
                             "pass --teacher to measure the run's teacher instead")
        for name in nets.names():
            nets.get(name).eval()
        label = "teacher" if args.teacher else f"{ctx.method.name} student"

        def denoiser_for(cond: Any) -> Denoiser:
            if args.teacher:
                return teacher_denoiser(teacher, cond)
            return pm.hook.fewstep_score_denoiser(ctx=ctx, nets=nets, cond=cond)
    else:
        from fewstep.data import DataConfig
        from fewstep.teacher import load_teacher

        teacher = load_teacher(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
        data_config, label = DataConfig(source=args.data), "teacher"

        def denoiser_for(cond: Any) -> Denoiser:
            return teacher_denoiser(teacher, cond)
    if teacher.vae is not None or teacher.conditioning == "text":
        raise ValueError("fewstep likelihood measures pixel-space models without text conditioning (unconditional "
                         f"or class-conditional); this one is {'latent' if teacher.vae is not None else 'text'}-"
                         "conditioned")
    if args.null_class and teacher.conditioning != "class":
        raise ValueError("--null-class: the model is not class-conditional")
    from fewstep.evaluation import source_dataset
    from fewstep.types import Cond

    data = source_dataset(data_config, teacher, args.data)
    n = len(data)
    if not 0 < args.num <= n:
        raise ValueError(f"--num {args.num}: the source has {n} images")
    generator = torch.Generator().manual_seed(args.seed)
    x, labels, _ = data.get(torch.arange(n - args.num, n))
    if teacher.conditioning == "class" and not args.null_class and labels is None:
        raise ValueError(f"likelihood: the model is class-conditional and {args.data} has no labels (idx: a sibling "
                         "labels file); score log p(x) under the null class with --null-class instead")
    if args.dequantize:
        x = x + torch.rand(x.shape, generator=generator) * (2.0 / 256)
    lo = args.sigma_min or teacher.process.sigma_min
    hi = args.sigma_max or teacher.process.sigma_max
    bpd = []
    for rows in torch.arange(args.num).split(args.batch):
        cond = None
        if teacher.conditioning == "class":  # log p(x | y) with each image's label, or log p(x) at the null label
            cond = (teacher.null_cond(len(rows)) if args.null_class
                    else Cond(labels=labels[rows].to(teacher.device)))
        chunk = x[rows]
        res = log_likelihood(denoiser_for(cond), chunk.to(teacher.device), lo, hi, args.ode_steps, args.probe,
                             generator)
        bpd.append(res.bits_per_dim(chunk[0].numel()).cpu())
    values = torch.cat(bpd)
    mean, se = float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    result = {"model": str(args.model), "scored": label, "data": args.data, "num": args.num, "bits_per_dim": mean,
              "standard_error": se, "ode_steps": args.ode_steps, "probe": args.probe, "sigma_min": lo,
              "sigma_max": hi, "dequantize": args.dequantize, "seed": args.seed,
              "condition": ("none" if teacher.conditioning == "none"
                            else "null class" if args.null_class else "each image's class")}
    print(json.dumps(result, indent=2))
    return 0
