"""LowDiff (``lowdiff``): one unified denoiser for a resolution cascade, and its cascaded sampler.

Xu et al. 2025, "LowDiff: Efficient Diffusion Sampling with Low-Resolution Condition" (arXiv 2509.15342;
distribution.md §7). Only the abstract could be read; it says [P]: a cascade generates increasingly higher
resolutions with one unified model that refines low-resolution outputs up to the target size, needs far fewer
high-resolution steps for comparable quality, works in pixel and latent space, and gains over 50 % throughput.
Everything else here is this implementation's choice, unverified against the paper (see fewstep.cascade):

- The model is the teacher's backbone reading a condition image, the previous stage's output up-sampled to the
  current size (zeros at the lowest stage), in ``Cond.image``, and a zero-initialised scalar input ``stage``
  (``Backbone.add_image_channels`` / ``add_scalar_inputs``), so it starts as the teacher and is fine-tuned on
  every stage. Training it from scratch would need the ``diffusion`` plugin's architecture spec in the core.
- Training (like the ``diffusion`` plugin: the process's regression target at a random time, label dropout
  for guidance): each step draws one stage k for the whole global batch (one network call, so multi-process
  training reduces gradients once), block-averages the data to r_k, and conditions on the data at r_{k-1}
  up-sampled, plus Gaussian conditioning augmentation (Cascaded Diffusion Models, Ho et al. 2022 [P]).
- Sampling: stage 0 from noise, then each stage conditioned on the previous output, with fewer steps at higher
  resolution (``step_ratio``, ``stage_steps``), optionally starting from the noised up-sample (``start_sigma``).

Distillation of every stage by existing methods (docs/LOWDIFF.md): the export also writes one teacher folder per
stage, each any method distils at ``data.resolution`` = the stage's size without knowing LowDiff:
``base_teacher/`` (stage 0: its condition channels read zeros and its ``stage`` input 0 when left out) and
``stage_teachers/<k>/`` for k >= 1 (its ``stage`` input fixed to stage k by ``Backbone.set_scalar_default``, its
condition image made from the data by the folder's ``image_condition``, fewstep.imagecond: the data block-averaged
to r_{k-1}, up-sampled and noised as in training). ``stage_students`` (or ``base_student`` for stage 0) puts such
students back in the cascade, which feeds each one the previous stage's up-sampled output in ``Cond.image``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from fewstep_plugins.lowdiff_config import LowDiffConfig, fewstep_configure, fewstep_method_config  # noqa: F401 - re-exported from the config module
from torch import Tensor, nn

from fewstep import cascade
from fewstep.diffusion import cfg as cfg_combine
from fewstep.hookspecs import hookimpl
from fewstep.imagecond import ImageCondition
from fewstep.nn import unwrap
from fewstep.sampling import sampling_net
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, RunContext, StepInfo

BASE_TEACHER = "base_teacher"
#: stage_teachers/<k>/: stage k >= 1 as an image-conditioned teacher folder
STAGE_TEACHERS = "stage_teachers"


def _resolutions(method: LowDiffConfig, size: int) -> list[int]:
    if method.resolutions is None:
        if size % 4:
            raise ValueError(f"method.resolutions: the default [R/4, R/2, R] needs the size {size} divisible by 4; "
                             "set method.resolutions")
        return [size // 4, size // 2, size]
    return cascade.check_resolutions(method.resolutions, size)


@hookimpl
def fewstep_build_student(ctx: RunContext, teacher) -> nn.Module:
    """The teacher's backbone plus condition-image channels and a ``stage`` input, both zero-initialised (so it
    starts as the teacher); a teacher that already is a LowDiff model is copied as it is."""
    net = teacher.net
    _resolutions(ctx.method, net.sample_size)
    student = copy.deepcopy(net).float()
    if "stage" not in student.extra_scalars:
        if student.extra_channels:
            raise ValueError(f"method 'lowdiff': the teacher {teacher.source} already reads {student.extra_channels} "
                             "extra input channels (self-conditioning?); give a plain teacher")
        student.add_image_channels(student.in_channels)
        student.add_scalar_inputs(["stage"])
    return _unified(student).requires_grad_(True).train()


def _unified(net: nn.Module) -> nn.Module:
    """A LowDiff model saved before ``Cond.image`` existed read its condition as ``extra_input`` (the same input
    channels): read them from Cond.image instead. Returns ``net``."""
    model = unwrap(net)
    if not model.image_channels and model.extra_channels == model.in_channels:
        model.set_image_channels(model.extra_channels)
    return net


@hookimpl
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput:
    """Regress the raw output on the process's target (DDPM Eq. 14 / EDM Eq. 8 / FM) at stage k's size, given
    the data at r_{k-1} up-sampled (plus augmentation noise) as the condition."""
    process, x0 = nets.teacher.process, batch.x0
    if x0 is None:
        raise ValueError("method 'lowdiff' needs images: the data source has none")
    res = _resolutions(ctx.method, x0.shape[-1])
    probs = torch.tensor(ctx.method.stage_probs or [1.0] * len(res), dtype=torch.float64)
    # One stage for the whole global batch: the first of the step's global draws (same on every rank).
    k = int(step.draw(lambda n, g: torch.multinomial(probs, 1, generator=g).expand(n))[0])
    t = step.draw(lambda n, g: process.sample_train_t(n, g)).to(x0.device)
    eps, aug = step.randn_like(x0), step.randn_like(x0)
    cond = batch.cond
    if batch.uncond is not None and ctx.method.p_uncond > 0:
        cond = cond.where(step.rand() < ctx.method.p_uncond, batch.uncond)
    r = res[k]
    target_x0, eps = cascade.downsample(x0, r), cascade.pooled_noise(eps, r)
    low = cascade.lowres_condition(x0, res, k, ctx.method.upsampling)
    if k > 0:
        low = low + ctx.method.cond_noise * cascade.pooled_noise(aug, r)
    x_t = process.add_noise(target_x0, eps, t)
    out = nets.student(process.c_in(t)[:, None, None, None] * x_t, process.model_time(t), cond.with_image(low),
                       stage=cascade.stage_input(k))
    err = (out.float() - process.output_target(target_x0, eps, t).float()).square().flatten(1).mean(1)
    return LossOutput(loss=process.loss_weight(t).float() * err)


@functools.cache
def _load_student(folder: Path, device: str):
    from fewstep.export import load_export

    return load_export(folder, device=device)


def _stage_students(ctx: RunContext, res: list[int]) -> dict[int, Path]:
    students = dict(ctx.method.stage_students)
    if ctx.method.base_student is not None:
        students[0] = ctx.method.base_student
    bad = [k for k in students if not 0 <= k < len(res)]
    if bad:
        raise ValueError(f"method.stage_students names stages {bad}; this cascade has stages 0..{len(res) - 1} "
                         f"(resolutions {res})")
    return students


def _stage_sampler(ctx: RunContext, k: int, folder: Path, size: int, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> cascade.StageSampler:
    """Stage k from the export of a student distilled from base_teacher/ (k = 0) or stage_teachers/<k>/, at its
    own ``num_steps``-step sampler, in model space (loaded once per folder and device); stage k > 0 gets the
    condition as its ``Cond.image``."""
    from fewstep.sampling import eval_mode

    loaded = _load_student(Path(folder).resolve(), str(ctx.device))
    net = unwrap(loaded.nets.student)
    where = f"method.stage_students[{k}] {folder}"
    if loaded.nets.teacher.sample_shape[-1] != size:
        raise ValueError(f"{where} samples at {loaded.nets.teacher.sample_shape[-1]}, the cascade's stage {k} at "
                         f"{size}; distil {stage_folder(k)} of this model's export")
    stage = net.scalar_defaults.get("stage", 0.0) if "stage" in net.extra_scalars else None
    if bool(net.image_channels) != (k > 0) or (stage is not None and stage != float(cascade.stage_input(k))):
        raise ValueError(f"{where} is not a student of stage {k} (it reads {net.image_channels} condition-image "
                         f"channels, stage input {stage}); distil {stage_folder(k)} of this model's export")

    def sample(noise: Tensor, low: Tensor) -> Tensor:
        c = cond if k == 0 else (cond if cond is not None else Cond()).with_image(low)
        with eval_mode(*[loaded.nets.get(n) for n in loaded.nets.names()]):
            return loaded.hook.fewstep_sample(ctx=loaded.ctx, nets=loaded.nets, noise=noise, cond=c,
                                              num_steps=num_steps, generator=generator)

    return sample


@hookimpl
def fewstep_sample(ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int,
                   generator: torch.Generator) -> Tensor:
    """The cascade (``fewstep.cascade.cascade_sample``) with CFG at teacher.guidance; ``num_steps`` is the
    lowest stage's step count, later stages take ``method.stage_steps`` / ``step_ratio`` of it."""
    method, process, net = ctx.method, nets.teacher.process, _unified(sampling_net(nets))
    res = _resolutions(method, noise.shape[-1])
    steps = cascade.stage_steps(num_steps, len(res), method.step_ratio, method.stage_steps)
    guidance = ctx.config.teacher.guidance
    uncond = nets.teacher.null_cond(noise.shape[0], device=noise.device) if guidance != 1.0 else None

    def denoise(x: Tensor, sigma: Tensor, low: Tensor, k: int) -> Tensor:
        c = (cond if cond is not None else Cond()).with_image(low)
        x0 = process.denoise(net, x, sigma, c, stage=cascade.stage_input(k))
        if uncond is not None:
            x0 = cfg_combine(x0, process.denoise(net, x, sigma, uncond.with_image(low), stage=cascade.stage_input(k)),
                             guidance)
        return process.x0_clip(x0)  # the teacher scheduler's x0 bound, after guidance (identity if it bounds nothing)

    students = {k: _stage_sampler(ctx, k, folder, res[k], cond, steps[k], generator)
                for k, folder in _stage_students(ctx, res).items()}
    return cascade.cascade_sample(denoise, noise.float(), res, steps, process.sampling_sigmas, solver=method.solver,
                                  upsampling=method.upsampling, cond_noise=method.cond_noise,
                                  start_sigma=method.start_sigma, sigma_min=process.sigma_min, generator=generator,
                                  students=students)


@hookimpl
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path, sampling_networks: list[str], stock, reason: str) -> Path:
    """The cascade as a FewStepPipeline (its student reads condition channels, so no stock pipeline applies), plus
    one teacher folder per stage for distillation with any method: ``base_teacher/`` (stage 0) and
    ``stage_teachers/<k>/`` (stage k >= 1, image-conditioned; see the module docstring)."""
    from fewstep.export import run_metrics, write_export
    from fewstep.teacher import save_teacher

    if not ctx.is_main:
        return out_dir
    student = unwrap(_unified(sampling_net(nets)))
    write_export(ctx, nets, out_dir, student=student, stock=stock, reason=reason,
                 extra={n: nets.get(n) for n in sampling_networks}, metrics=run_metrics(ctx.run_dir))
    teacher = nets.teacher
    for k in range(len(_resolutions(ctx.method, student.sample_size))):
        stage, condition = stage_teacher(ctx.method, student, k)
        save_teacher(Path(out_dir) / stage_folder(k), stage, teacher.process, vae=teacher.vae,
                     text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, image_condition=condition)
    return out_dir


def stage_folder(k: int) -> str:
    """The export's sub-folder holding stage k as a teacher."""
    return BASE_TEACHER if k == 0 else f"{STAGE_TEACHERS}/{k}"


def stage_teacher(method: LowDiffConfig, model: nn.Module, k: int) -> tuple[nn.Module, ImageCondition | None]:
    """Stage k of the unified ``model`` as a network any method distils, and how the data makes its condition.

    Stage 0: a copy at r_0 whose condition channels read zeros when left out (``extra_input``) and whose ``stage``
    input is 0 when left out, so a call without either is stage 0 exactly; no image condition. Stage k >= 1: a copy
    at r_k whose ``stage`` input defaults to stage k (``Backbone.set_scalar_default``) and which reads its condition
    from ``Cond.image``, made from data at r_k as in training: block average to r_{k-1}, up-sampling, ``cond_noise``.
    """
    res = _resolutions(method, model.sample_size)
    stage = copy.deepcopy(unwrap(_unified(model)))
    stage.sample_size = res[k]
    stage.model.register_to_config(sample_size=res[k])
    if k == 0:
        stage.set_image_channels(0)
        return stage, None
    stage.set_scalar_default("stage", float(cascade.stage_input(k)))
    return stage, ImageCondition("lowres", res[k - 1], method.upsampling, method.cond_noise)
