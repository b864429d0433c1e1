"""Example method plugin: knowledge distillation (Luhman & Luhman, 2021, arXiv:2101.02388).

The student maps noise to the teacher's multistep ODE sample from the same noise in one step. The
pairs are made on the fly here, so its method is ``kd_online``; the built-in method ``kd``
(plugins/kd.py) reads them from a ``fewstep pairs`` store instead. Install with
``pip install examples/custom_plugin`` and run ``fewstep distill examples/custom_plugin/kd.yaml``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.types import LossOutput


class KDConfig(MethodConfig):
    name: Literal["kd_online"] = "kd_online"
    teacher_steps: int = Field(16, ge=1, description="Teacher Heun steps that make each target.")


@hookimpl
def fewstep_method_config():
    return ("kd_online", KDConfig)


def one_step(net, process, noise, cond):
    """Student sample in one evaluation: its denoiser at the top noise level."""
    sigma_max = process.sigma_max
    sigma = torch.full((noise.shape[0],), sigma_max, device=noise.device)
    return process.denoise(net, noise * sigma_max, sigma, cond)


@hookimpl
def fewstep_loss(ctx, batch, nets, step):
    teacher = nets.teacher
    noise = step.randn(*teacher.sample_shape)
    target = teacher.sample(noise, batch.cond, num_steps=ctx.method.teacher_steps, solver="heun")
    target = teacher.encode(target)  # back to model space (identity for pixel teachers)
    out = one_step(nets.student, teacher.process, noise, batch.cond)
    return LossOutput(loss=(out - target).square().flatten(1).mean(1))


@hookimpl
def fewstep_sample(nets, noise, cond):
    return one_step(sampling_net(nets), nets.teacher.process, noise, cond)
