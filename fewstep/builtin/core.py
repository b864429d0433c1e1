"""Core defaults for the provider hooks, registered ``trylast`` so any method plugin wins."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewstep.hookspecs import hookimpl
from fewstep.types import OptimizerGroup, Phase, RunContext


@hookimpl(trylast=True)
def fewstep_build_teacher(ctx: RunContext):
    from fewstep.teacher import load_teacher

    path = ctx.config.teacher.pretrained
    if path is None:
        raise ValueError(f"teacher.pretrained: method {ctx.method.name!r} distils a teacher, so the recipe must "
                         "give a local diffusers folder (a pipeline folder with model_index.json, or a model "
                         "folder with config.json and a scheduler config)")
    # fp32 here: the student copies these weights; the trainer then casts the teacher to ctx.dtype.
    return load_teacher(path, weak=ctx.config.teacher.autoguidance, device="cpu", dtype=torch.float32)


@hookimpl(trylast=True)
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    """A trainable fp32 copy of the teacher's backbone: the student equals its teacher at step 0."""
    student = copy.deepcopy(teacher.net).float()
    return student.requires_grad_(True).train()


@hookimpl(trylast=True)
def fewstep_optimizer_groups(ctx: RunContext, nets) -> list[OptimizerGroup]:
    return [OptimizerGroup.from_recipe(ctx.config.optimizer)]


@hookimpl(trylast=True)
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase]:
    return [Phase("train", tuple(g.name for g in groups), duration_nimg=None)]
