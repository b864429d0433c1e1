"""Teacher pretraining (``diffusion``): denoising score matching on VP/DDPM and EDM processes, flow
matching on rectified-flow processes, so the project can make its own teachers.

Without ``teacher.pretrained`` the network is built from ``method.backbone`` (a diffusers
UNet2DModel or DiTTransformer2DModel) and ``method.process``; with it, the given teacher is
fine-tuned. The export is a teacher folder that ``teacher.pretrained`` of any recipe accepts (for an
unconditional pixel UNet on a VP process it is also a stock diffusers ``DDPMPipeline``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from fewstep_plugins.diffusion_config import BackboneSpec, DiffusionConfig, ProcessSpec, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep import selfcond
from fewstep.diffusion import cfg as cfg_combine
from fewstep.diffusion import sample_ode
from fewstep.hookspecs import hookimpl
from fewstep.nn import unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo


def build_backbone(spec: BackboneSpec, size: int, channels: int):
    """A freshly initialised diffusers backbone wrapped as a fewstep Backbone."""
    from fewstep.backbones import Backbone

    if spec.type == "dit":
        from diffusers import DiTTransformer2DModel

        if spec.num_classes is None:
            raise ValueError("method.backbone: a DiT is class-conditional in diffusers; set backbone.num_classes")
        model = DiTTransformer2DModel(
            num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
            in_channels=channels, out_channels=channels, num_layers=spec.num_layers, sample_size=size,
            patch_size=spec.patch_size, num_embeds_ada_norm=spec.num_classes, norm_type="ada_norm_zero")
        return Backbone(model, num_classes=spec.num_classes)
    from diffusers import UNet2DModel

    levels = len(spec.block_out_channels)
    if size % 2 ** (levels - 1):
        raise ValueError(f"method.backbone: {levels} UNet levels need the image size ({size}) divisible by "
                         f"{2 ** (levels - 1)}; set data.resolution or use fewer block_out_channels")
    attn = set(spec.attention_levels)
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels)))
    model = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=spec.norm_num_groups, dropout=spec.dropout,
        attention_head_dim=8, num_class_embeds=None if spec.num_classes is None else spec.num_classes + 1)
    return Backbone(model, num_classes=spec.num_classes)


@hookimpl
def fewstep_build_teacher(ctx: RunContext):
    """From scratch: the 'teacher' is the untrained architecture and process the student copies."""
    if ctx.config.teacher.pretrained is not None:
        return None  # fine-tune the given teacher (core default loader)
    from fewstep.teacher import Teacher

    data = ctx.config.data
    if data.resolution is None or data.channels is None:
        raise ValueError("data.resolution and data.channels: training a teacher from scratch needs both, "
                         "e.g. resolution: 16, channels: 1")
    net = build_backbone(ctx.method.backbone, data.resolution, data.channels)
    if ctx.method.self_condition:
        net.enable_self_conditioning()
    return Teacher(net, ctx.method.process.build(), source=Path("(from scratch)"))


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module | None:
    """Fine-tuning a teacher into a self-conditioned one: its copy gains the estimate channels."""
    if not ctx.method.self_condition or teacher.net.self_conditioning:
        return None
    student = copy.deepcopy(teacher.net).float()
    student.enable_self_conditioning()
    return student.requires_grad_(True).train()


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Regress the raw output on the process's target at a random time (DDPM Eq. 14 / EDM Eq. 8 / FM)."""
    process = nets.teacher.process
    x0 = batch.x0
    if x0 is None:
        raise ValueError("method 'diffusion' needs images: the data source has none")
    t = step.draw(lambda n, g: process.sample_train_t(n, g)).to(x0.device)
    eps = step.randn_like(x0)
    x_t = process.add_noise(x0, eps, t)
    cond = batch.cond
    if batch.uncond is not None and ctx.method.p_uncond > 0:
        cond = cond.where(step.rand() < ctx.method.p_uncond, batch.uncond)
    estimate = None
    if ctx.method.self_condition:  # Analog Bits §6.1: the estimate slot, in sigma space (x = x_t / alpha)
        x, sigma = x_t / process.alpha(t)[:, None, None, None], process.t_to_sigma(t)
        estimate = selfcond.training_estimate(process, nets.student, x, sigma, cond, selfcond.mask(step),
                                              clip=nets.teacher.vae is None)
    out = nets.student(process.c_in(t)[:, None, None, None] * x_t, process.model_time(t), cond, extra_input=estimate)
    err = (out.float() - process.output_target(x0, eps, t).float()).square().flatten(1).mean(1)
    return LossOutput(loss=process.loss_weight(t).float() * err)


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """The trained model's own ODE sampler (num_steps solver steps), with CFG at teacher.guidance."""
    process, net = nets.teacher.process, sampling_net(nets)
    guidance = ctx.config.teacher.guidance
    uncond = nets.teacher.null_cond(noise.shape[0], device=noise.device) if guidance != 1.0 else None

    def denoise(x: Tensor, sigma: Tensor, estimate: Tensor | None = None) -> Tensor:
        x0 = process.denoise(net, x, sigma, cond, extra_input=estimate)
        if uncond is not None:
            x0 = cfg_combine(x0, process.denoise(net, x, sigma, uncond, extra_input=estimate), guidance)
        return process.x0_clip(x0)  # the scheduler's x0 bound, after guidance as in Teacher.denoise (identity if none)

    if selfcond.enabled(net):  # Analog Bits §6.2: each step reads the previous step's estimate
        denoise = selfcond.RunningEstimate(denoise, clip=nets.teacher.vae is None)
    sigmas = process.sampling_sigmas(num_steps).to(noise.device)
    return sample_ode(denoise, noise.float() * sigmas[0], sigmas, ctx.method.solver)


@hookimpl
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path) -> Path:
    """The trained model (EMA when present) as a teacher folder usable as teacher.pretrained."""
    from fewstep.teacher import save_teacher

    if ctx.is_main:
        teacher = nets.teacher
        save_teacher(out_dir, unwrap(sampling_net(nets)), teacher.process, vae=teacher.vae,
                     text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer)
    return out_dir
