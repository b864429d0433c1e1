"""Knowledge distillation, method ``kd`` (Luhman & Luhman, "Knowledge Distillation in Iterative Generative
Models for Improved Sampling Speed", 2021, arXiv:2101.02388): the student regresses in one step onto the
teacher's deterministic ODE solution for the same noise, y = ODE_teacher(z), from a pair store (``data.pairs``,
made once by ``fewstep pairs``, shared with DMD, CAF and reflow). The teacher is never called in training.

The student is a copy of the teacher read as a denoiser (``NoiseProcess.denoise``): its one-step sample is
G(z) = D_student(s_0·z, s_0), s_0 the level where the pairs' ODE starts (the teacher sampler's first level),
so the coupling z -> y the student learns is exactly the teacher's. The loss is d(G(z), y) per sample with a
distance of ``fewstep.losses`` (L2 as the paper's mean squared error [R]; pseudo-Huber as iCT).

Multistep variant (a fewstep extension, not in the paper): with ``num_steps`` N > 1 the student also trains at
the lower levels s_1 > ... > s_{N-1} of DMD2's generator grid, on the teacher's images noised there, y + s_k·eps
with target y, one level per step (k uniform; k = 0 is the coupling above), and samples with DMD2's re-noising
sampler (``fewstep.distribution.few_step_sample``). With N = 1 the 2- and 4-step rows use that sampler too, at
levels where the student is only its teacher initialisation.

Costs per trainer step (B pairs): one student forward and backward; no teacher call. The pairs cost
``num x steps x 2`` teacher evaluations once (Heun), on disk for every run that reuses the store.
"""

from __future__ import annotations

import torch
from fewstep_plugins.kd_config import KDConfig, fewstep_configure, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor

from fewstep.diffusion import append_dims
from fewstep.distribution import Denoiser, denoiser, few_step_sample, generator_levels, training_sigmas
from fewstep.hookspecs import hookimpl
from fewstep.losses import Distance, distance
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo


def student_levels(process, num_steps: int) -> Tensor:
    """(N,) descending levels: s_0 = the teacher sampler's first level (where the pairs' ODE starts), then
    DMD2's generator levels of the training grid below it."""
    start = float(process.sampling_sigmas(1)[0])
    return generator_levels(training_sigmas(process), num_steps, start)


def kd_loss(student: Denoiser, z: Tensor, y: Tensor, levels: Tensor, k: Tensor, eps: Tensor, kind: Distance,
            c: float | None = None) -> Tensor:
    """Per-sample d(D(x_k, s_k), y) (B,): x_0 = s_0·z (the coupling), x_k = y + s_k·eps for k > 0.

    z, y, eps: (B, C, H, W) noise, the teacher's image for z, fresh noise; levels: (N,); k: (B,) level index."""
    sigma = levels.to(z.device)[k]
    coupled = append_dims(k == 0, z.ndim)
    x = torch.where(coupled, z * append_dims(sigma, z.ndim), y + append_dims(sigma, z.ndim) * eps)
    return distance(student(x, sigma).float(), y.float(), kind, c)


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    cfg, process = ctx.method, nets.teacher.process
    if batch.pairs is None:
        raise ValueError("method kd needs teacher couplings: set data.pairs to a `fewstep pairs` store")
    z, y = (p.float() for p in batch.pairs)
    levels = student_levels(process, cfg.num_steps)
    k = step.randint(0, cfg.num_steps).to(z.device)
    eps = step.randn_like(z)
    loss = kd_loss(denoiser(process, nets.student, batch.pair_cond), z, y, levels, k, eps, cfg.distance,
                   cfg.huber_c)
    return LossOutput(loss=loss, terms={"coupled": (k == 0).float().mean()})


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """One step: G(z) = D(s_0·z, s_0). k steps: DMD2's re-noising sampler over k levels from s_0."""
    process = nets.teacher.process.for_sampler()  # the teacher scheduler's x0 bound
    levels = student_levels(process, num_steps)
    return few_step_sample(denoiser(process, sampling_net(nets), cond), noise, levels, generator)
