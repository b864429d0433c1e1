"""The diffusers export of a trained student and the pipeline that samples from it (DESIGN.md §7, §9).

Exports are stock first. A method declares, through the hook ``fewstep_stock_sampler``, which stock diffusers
scheduler reproduces its N-step sampler (a :class:`StockSampler`); the export then writes the teacher family's
own pipeline (:data:`STOCK_PIPELINES`: ``StableDiffusionPipeline``, ``DiTPipeline``, ``ConsistencyModelPipeline``
...) with the student as a plain diffusers model in place of the teacher's denoiser, and that scheduler.
``DiffusionPipeline.from_pretrained(OUT)`` loads it with diffusers alone (no fewstep, no remote code). Where no
stock scheduler reproduces the sampler (CTM's gamma sampler, CAF, MSD's routing, students with inputs a stock
model cannot hold), the export is fewstep's :class:`FewStepPipeline`, and it says why (printed, and in the
model card).

An export folder, written at the end of training and by ``fewstep export RUN OUT``::

    model_index.json       the pipeline class and components: DiffusionPipeline.from_pretrained(OUT) loads it
    unet/ | transformer/   the student (its EMA when the run keeps one): diffusers weights and config (plus an
                           fp16 ``variant`` where the teacher's denoiser had one), and fewstep's metadata
    scheduler/             the stock scheduler of the sampler, or (FewStepPipeline) the teacher's noise process
    vae/, text_encoder/, tokenizer/, ...   the teacher's other components, copied bit for bit
    pipeline_fewstep.py    FewStepPipeline only: two lines re-exporting the class (needs fewstep installed)
    fewstep_extra/<name>/  FewStepPipeline only: other networks the sampler needs (hook fewstep_sampling_networks)
    fewstep_export.json    method, pipeline, per-step call arguments, the resolved recipe, the noise process, metrics
    samples.png            a sample grid drawn at the export's default steps
    README.md              the model card in the Hub's format (YAML header, loading snippet, steps, recipe, metrics)

Constant scalar inputs. A student that takes a guidance scale w (guided, LCM-style CD) is sampled at a fixed w;
its zero-initialised w embedding (``fewstep.backbones.ScalarEmbedding``, added to the time embedding) then adds
one constant vector, which the stock export folds into the bias of the time embedding's last layer (exact up to
float rounding). :func:`load_export` unfolds it, so ``fewstep sample OUT`` still runs the w-conditioned student.
An SD / SDXL UNet student reads w natively instead (``Backbone.native_guidance``: ``time_cond_proj_dim``), so
nothing is folded and the stock pipeline's ``guidance_scale`` is w, which it may change.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor, nn

from fewstep.types import Cond, Nets, RunContext

__all__ = ["BOUNDARY_TOLERANCE", "EXPORT_META", "STOCK_PIPELINES", "FewStepPipeline", "LoadedExport", "StockExport",
           "StockPipeline", "StockSampler", "cm_boundary_coefficients", "export_run", "fold_scalars", "load_export",
           "model_card", "one_step_sampler", "plan_stock_export", "renoise_sampler", "run_metrics",
           "vp_scheduler_config", "vp_timesteps", "write_export"]

EXPORT_META = "fewstep_export.json"
PIPELINE_FILE = "pipeline_fewstep"
EXTRA_DIR = "fewstep_extra"
SAMPLES_FILE = "samples.png"
_FORMAT = 2
_SHIM = '''"""Makes `diffusers.DiffusionPipeline.from_pretrained(<this folder>)` find fewstep's pipeline.

Needs `pip install fewstep` and the plugin of the method that made this export."""
from fewstep.export import FewStepPipeline  # noqa: F401
'''
#: Largest distance of a sampler level from an integer timestep for a discrete (VP) stock scheduler, in
#: timestep units: levels are computed in float32 sigma space, so an integer timestep comes back as t ± 1e-4.
TIMESTEP_TOLERANCE = 1e-3
#: LCMScheduler's ``timestep_scaling`` that makes its boundary scalings c_skip = 0, c_out = 1 in float32 at every
#: timestep >= 1 (c_skip = 0.25 / (t * 1e4)^2 <= 2.5e-9): the scheduler returns the student's x0 prediction.
X0_TIMESTEP_SCALING = 1e4


@dataclass(frozen=True)
class StockSampler:
    """How a stock diffusers scheduler reproduces a method's N-step sampler (hook ``fewstep_stock_sampler``).

    scheduler / config: the diffusers scheduler class name and its config (without ``_class_name``).
    num_inference_steps: N. timesteps / sigmas: the custom schedule the pipeline passes to ``set_timesteps``
        (None: the scheduler's own ``set_timesteps(N)`` is the sampler's schedule).
    scalars: constant extra scalar inputs the sampler feeds the student, as given to the backbone (e.g.
        ``{"w": 400.0}``); the export folds them into the denoiser (see the module docstring).
    guidance_scale: the pipeline's ``guidance_scale`` when the student reads it (a guidance embedding); None:
        the pipeline's no-guidance value (a distilled student is never run with classifier-free guidance).
    latents_scale: c such that the pipeline's initial noise L (``latents``, unit normal, before it multiplies by
        the scheduler's ``init_noise_sigma``) is fewstep's noise c·z: fewstep starts at the sampler's first level
        sigma_0, i.e. x_t = alpha_0·sigma_0·z, where a DDPM-family pipeline starts from pure unit noise (VP at
        timestep 999: c = sqrt(1 - alphā_999), 0.9976 for Stable Diffusion's schedule).
    note: what the scheduler does, one line for the model card.
    """

    scheduler: str
    config: Mapping[str, Any]
    num_inference_steps: int
    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    guidance_scale: float | None = None
    latents_scale: float = 1.0
    note: str = ""


@dataclass(frozen=True)
class StockPipeline:
    """A family's stock diffusers pipeline as the export uses it (one row of :data:`STOCK_PIPELINES`).

    name: the pipeline class; component: the denoiser's component name; condition: the call argument that
    carries the condition ("prompt" or "class_labels"); schedule_args: which of ``timesteps`` / ``sigmas`` it
    forwards to the scheduler; takes_latents: whether it accepts ``latents=`` (else it draws them from
    ``generator``); renoise_generator: whether it passes ``generator`` to ``scheduler.step`` (DiTPipeline does
    not: multistep re-noising then draws from torch's global generator); scales_input: whether it calls
    ``scheduler.scale_model_input`` (the FlowMatch schedulers have none); scales_noise: whether it multiplies its
    initial noise by the scheduler's ``init_noise_sigma`` (DiTPipeline does not); batch_size: whether it needs
    ``batch_size`` also with class labels; size_args: whether it takes ``height`` / ``width`` (passed: the
    teacher's image size, where e.g. FluxPipeline would default to 1024); packed_noise: its scheduler draws
    re-noising noise in the packed token layout (FluxPipeline): the same sampler, but for N > 1 steps not the
    same images as fewstep's for one seed; no_guidance: call arguments that turn
    off its classifier-free guidance; index: model_index.json entries it needs besides the components.
    """

    name: str
    component: str
    condition: str
    schedule_args: frozenset[str]
    takes_latents: bool = True
    renoise_generator: bool = True
    scales_input: bool = True
    scales_noise: bool = True
    batch_size: bool = False
    size_args: bool = False
    packed_noise: bool = False
    no_guidance: Mapping[str, Any] = field(default_factory=dict)
    index: Mapping[str, Any] = field(default_factory=dict)


_SD_INDEX = {"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
_NO_CFG = {"guidance_scale": 1.0}
#: PixArt and Sana bin the requested size to their training aspect ratios; fewstep samples at the teacher's size.
_NATIVE_SIZE = {"guidance_scale": 1.0, "use_resolution_binning": False}

#: How the export calls each family's stock pipeline, by pipeline class (the family table,
#: ``fewstep.families.FAMILIES``, names each family's pipeline). Checked against diffusers 0.42.1's sources:
#: which of timesteps / sigmas / latents / generator each forwards, and whether it calls scale_model_input and
#: multiplies its initial noise by init_noise_sigma.
STOCK_PIPELINES: dict[str, StockPipeline] = {p.name: p for p in (
    # Pixel UNets (unconditional or class labels): DDPMPipeline takes no class labels, latents or timesteps.
    # ConsistencyModelPipeline checks latents against 3 channels, so its own draw from `generator` is used.
    StockPipeline("ConsistencyModelPipeline", "unet", "class_labels", frozenset({"timesteps"}), takes_latents=False,
                  batch_size=True),
    StockPipeline("StableDiffusionPipeline", "unet", "prompt", frozenset({"timesteps", "sigmas"}),
                  no_guidance=_NO_CFG, index=_SD_INDEX),
    StockPipeline("StableDiffusionXLPipeline", "unet", "prompt", frozenset({"timesteps", "sigmas"}),
                  no_guidance=_NO_CFG),
    StockPipeline("StableDiffusion3Pipeline", "transformer", "prompt", frozenset({"sigmas"}), renoise_generator=False,
                  scales_input=False, scales_noise=False, no_guidance=_NO_CFG),
    # FluxPipeline's latents are packed 2x2 tokens: its own (unpacked) draw from `generator` is used. Its
    # guidance_scale feeds only a guidance embedding (StockSampler.guidance_scale); CFG needs true_cfg_scale > 1.
    StockPipeline("FluxPipeline", "transformer", "prompt", frozenset({"sigmas"}), takes_latents=False,
                  renoise_generator=False, scales_input=False, scales_noise=False, packed_noise=True),
    StockPipeline("PixArtAlphaPipeline", "transformer", "prompt", frozenset({"timesteps", "sigmas"}),
                  no_guidance=_NATIVE_SIZE),
    StockPipeline("PixArtSigmaPipeline", "transformer", "prompt", frozenset({"timesteps", "sigmas"}),
                  no_guidance=_NATIVE_SIZE),
    StockPipeline("SanaPipeline", "transformer", "prompt", frozenset({"timesteps", "sigmas"}), scales_input=False,
                  scales_noise=False, no_guidance=_NATIVE_SIZE),
    StockPipeline("DiTPipeline", "transformer", "class_labels", frozenset(), takes_latents=False,
                  renoise_generator=False, scales_noise=False, no_guidance=_NO_CFG),
)}
# Every text-to-image pipeline takes height / width.
STOCK_PIPELINES.update({k: replace(p, size_args=True) for k, p in STOCK_PIPELINES.items() if p.condition == "prompt"})


@dataclass(frozen=True)
class StockExport:
    """A resolved stock export: the pipeline, the scheduler (one config for every step count) and the sampler
    of each step count it reproduces, keyed by N; scalars: the constant scalar inputs folded into the student."""

    pipeline: StockPipeline
    scheduler: str
    config: Mapping[str, Any]
    samplers: Mapping[int, StockSampler]
    scalars: Mapping[str, float]
    size: tuple[int, int] = (0, 0)  # the teacher's image size (height, width)

    def call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """The pipeline call arguments that reproduce fewstep's ``num_steps``-step sampler."""
        s = self.samplers[num_steps]
        kwargs: dict[str, Any] = {"num_inference_steps": s.num_inference_steps}
        if s.timesteps is not None and "timesteps" in self.pipeline.schedule_args:
            kwargs = {"timesteps": list(s.timesteps)}
        elif s.sigmas is not None and "sigmas" in self.pipeline.schedule_args:
            kwargs["sigmas"] = list(s.sigmas)
        kwargs.update(self.pipeline.no_guidance)
        if self.pipeline.size_args:
            kwargs.update(height=self.size[0], width=self.size[1])
        if s.guidance_scale is not None:
            kwargs["guidance_scale"] = s.guidance_scale
        return kwargs


# ------------------------------------------------------------------------------------------------
# Helpers for method plugins: the stock schedulers of common few-step samplers


def vp_timesteps(process: Any, sigmas: Sequence[float] | Tensor) -> tuple[int, ...] | None:
    """The integer timesteps of a VP process at sigma-space levels, or None when the process is not VP or a
    level is not within :data:`TIMESTEP_TOLERANCE` of an integer timestep (a discrete stock scheduler cannot
    evaluate there)."""
    if process.kind != "vp":
        return None
    t = process.sigma_to_t(torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1))
    steps = t.round()
    if bool(((t - steps).abs() > TIMESTEP_TOLERANCE).any()):
        return None
    return tuple(int(v) for v in steps.tolist())


def vp_scheduler_config(process: Any) -> dict[str, Any]:
    """The betas and parameterisation of a VP process as diffusers DDPM-family scheduler keys."""
    return {"num_train_timesteps": process.num_train_timesteps, "beta_start": process.beta_start,
            "beta_end": process.beta_end, "beta_schedule": process.beta_schedule,
            "trained_betas": process.trained_betas, "prediction_type": process.prediction_type}


def renoise_sampler(process: Any, levels: Sequence[float] | Tensor, *, clip: bool = False,
                    scalars: Mapping[str, float] | None = None) -> StockSampler | None:
    """The stock scheduler of the "predict x0, re-noise with fresh noise" sampler: x0 = D(s_1 z, s_1), then for
    each later level x0 = D(x0 + s_j z_j, s_j) (DMD2's multistep sampler; sCM's sampler in sigma space).

    VP: ``LCMScheduler`` at the levels' timesteps with ``timestep_scaling`` :data:`X0_TIMESTEP_SCALING` (its
    boundary scalings become c_skip = 0, c_out = 1) and ``clip_sample`` for a sampler that clamps x0 to [-1, 1];
    None when a level is off the integer timesteps. Flow: ``FlowMatchLCMScheduler`` with the levels' times
    t = sigma / (1 + sigma) as custom sigmas and shift 1 (its step is x0 = x_t - t v, then (1 - t') x0 + t' z);
    None when the sampler clamps. EDM: None (diffusers' consistency scheduler shifts its boundary scalings by
    its grid's sigma_min). levels: (N,) descending sigma-space levels; scalars: see :class:`StockSampler`."""
    levels = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    n = levels.numel()
    if process.kind == "vp":
        timesteps = vp_timesteps(process, levels)
        if timesteps is None or len(set(timesteps)) != n:
            return None
        config = {**vp_scheduler_config(process), "timestep_scaling": X0_TIMESTEP_SCALING, "clip_sample": clip}
        scale = float(levels[0] / (1 + levels[0] ** 2).sqrt())  # alpha_0 * sigma_0 = sqrt(1 - alphabar_0)
        return StockSampler("LCMScheduler", config, n, timesteps=timesteps, scalars=dict(scalars or {}),
                            latents_scale=scale,
                            note="x0 prediction at each timestep (c_skip = 0), re-noised with fresh noise")
    if process.kind == "flow" and not clip:
        t = levels / (1 + levels)
        config = {"num_train_timesteps": process.num_train_timesteps, "shift": 1.0, "use_dynamic_shifting": False}
        return StockSampler("FlowMatchLCMScheduler", config, n, sigmas=tuple(t.tolist()), scalars=dict(scalars or {}),
                            latents_scale=float(t[0]),
                            note="x0 = x_t - t v at each time t, re-noised to the next t with fresh noise")
    return None


#: How far a one-step consistency sampler's output may be from the plain denoiser's for its stock export (which
#: returns the denoiser's x0): |1 - b| and |a| * sigma for f = a x + b D. 1e-5 is below what shows in 8-bit images
#: and well above float32 rounding.
BOUNDARY_TOLERANCE = 1e-5


def one_step_sampler(process: Any, sigma: float, a: float, b: float, *, clip: bool = False,
                     scalars: Mapping[str, float] | None = None) -> StockSampler | None:
    """The stock scheduler of a one-step sampler f(sigma z, sigma) = a x + b D(x, sigma) (sigma space; a
    consistency function's boundary scalings at its top level): :func:`renoise_sampler` at sigma when f is
    the denoiser itself to :data:`BOUNDARY_TOLERANCE` (the LCM boundary on VP teachers, the CM boundary on
    flow teachers, whose sigma_min / sigma_max is 1e-6), else None."""
    if abs(1.0 - b) > BOUNDARY_TOLERANCE or abs(a) * sigma > BOUNDARY_TOLERANCE:
        return None
    return renoise_sampler(process, [sigma], clip=clip, scalars=scalars)


def cm_boundary_coefficients(sigma: float, sigma_min: float, sigma_data: float) -> tuple[float, float]:
    """(a, b) with consistency_from_denoiser(x, sigma, D) = a x + b D (CM's boundary scalings, sigma space)."""
    from fewstep.diffusion import consistency_from_denoiser

    s = torch.tensor([sigma], dtype=torch.float64)
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    return (float(consistency_from_denoiser(one, s, zero, sigma_min, sigma_data)),
            float(consistency_from_denoiser(zero, s, one, sigma_min, sigma_data)))


# ------------------------------------------------------------------------------------------------
# Folding constant scalar inputs into the denoiser


def _time_biases(backbone: Any) -> list[nn.Parameter]:
    """The biases after which the extra scalar embeddings' output is added (``Backbone.add_scalar_inputs``): the
    last Linear of DiT's per-block timestep embedders, else of the family's time-embedding MLP
    (``Family.time_embedding``, a diffusers TimestepEmbedding)."""
    if backbone.kind == "dit":
        return [block.norm1.emb.timestep_embedder.linear_2.bias for block in backbone.model.transformer_blocks]
    for _, path in backbone.family.time_embedding:
        try:
            emb = backbone.model.get_submodule(path)
        except AttributeError:
            continue
        if getattr(emb, "post_act", None) is None and isinstance(getattr(emb, "linear_2", None), nn.Linear):
            return [emb.linear_2.bias]
    raise ValueError(f"the {backbone.family.name} backbone's time embedding ends in no plain Linear, so constant "
                     "scalar inputs cannot be folded into it")


@torch.no_grad()
def fold_scalars(backbone: Any, scalars: Mapping[str, float], sign: float = 1.0) -> None:
    """Add (sign = -1: remove) the constant embedding of ``scalars`` to the time embedding's bias, in place.

    Every declared scalar is embedded (one left out counts as 0, as in ``Backbone.forward``), so after folding
    the diffusers model alone computes what the backbone computed with these inputs."""
    unknown = set(scalars) - set(backbone.extra_scalars)
    if unknown:
        raise ValueError(f"fold_scalars: {sorted(unknown)} are not scalar inputs of this backbone "
                         f"({list(backbone.extra_scalars)})")
    biases = _time_biases(backbone)
    ref = biases[0]
    total = torch.zeros_like(ref)
    for name in backbone.scalar_embeddings:  # a native guidance input (Backbone.native_guidance) has none
        value = torch.tensor([float(scalars.get(name, 0.0))], device=ref.device)
        total += backbone.scalar_embeddings[name](value)[0].to(ref.dtype)
    for bias in biases:
        bias.add_(sign * total)


# ------------------------------------------------------------------------------------------------
# Planning an export


def export_steps(ctx: RunContext) -> list[int]:
    """The step counts an export documents: its default steps and the run's validation steps."""
    cfg = ctx.config
    return sorted({int(cfg.export.steps), *(int(k) for k in cfg.validation.steps)})


def stock_pipeline(teacher: Any) -> StockPipeline | None:
    """The teacher family's stock pipeline (``Family.pipeline_class``, called as :data:`STOCK_PIPELINES` says), or
    None: pixel UNets use ConsistencyModelPipeline (see :data:`STOCK_PIPELINES`); every other stock pipeline
    decodes with a VAE, so a pixel-space teacher of another family (fewstep's own pixel text or DiT teachers)
    has none."""
    family = teacher.family
    name = "ConsistencyModelPipeline" if family.name == "pixel_unet" else family.pipeline_class
    spec = STOCK_PIPELINES.get(name or "")
    if spec is None or (teacher.vae is None) != (spec.name == "ConsistencyModelPipeline"):
        return None
    return spec


def _reproduces_schedule(sampler: StockSampler, config: Mapping[str, Any], pipeline: StockPipeline) -> bool:
    """Whether the pipeline runs the sampler's schedule: it forwards the custom schedule, or the scheduler's own
    ``set_timesteps(N)`` gives the same timesteps / sigmas."""
    if sampler.timesteps is None and sampler.sigmas is None:
        return True
    if sampler.timesteps is not None and "timesteps" in pipeline.schedule_args:
        return True
    if sampler.sigmas is not None and "sigmas" in pipeline.schedule_args:
        return True
    import diffusers

    scheduler = getattr(diffusers, sampler.scheduler).from_config(dict(config))
    try:
        scheduler.set_timesteps(sampler.num_inference_steps)
    except ValueError:  # e.g. LCMScheduler: more steps than original_inference_steps
        return False
    if sampler.timesteps is not None:
        return scheduler.timesteps.tolist() == list(sampler.timesteps)
    own = scheduler.sigmas[: sampler.num_inference_steps].double()
    return torch.allclose(own, torch.tensor(sampler.sigmas, dtype=torch.float64), rtol=0, atol=1e-6)


def _teacher_scheduler_options(teacher: Any, scheduler: str, sampler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher scheduler's x0 clipping / thresholding (``process.x0_clip``, read with diffusers' class defaults)
    as keys of a stock scheduler that has them (LCMScheduler, TCDScheduler, DDIMScheduler...): the student's
    samplers bound x0 with it (``NoiseProcess.for_sampler``), so the export's scheduler must too (issue 14).

    A sampler that also clamps its output to [-1, 1] (``clip_sample`` in ``sampler_config``) applies both bounds,
    clip_r then clip_1 = clip_min(r, 1): the range becomes min(r, 1). Thresholding wins over clip_sample in diffusers
    (and its output lies in [-1, 1]), so it needs nothing more. {} when the teacher bounds nothing."""
    import diffusers

    bound = teacher.process.x0_clip
    if not bound.active:
        return {}
    accepted = getattr(diffusers, scheduler).from_config({}).config
    options = {k: v for k, v in bound.config().items() if k in accepted}
    if sampler_config.get("clip_sample") and "clip_sample_range" in options:
        options["clip_sample"] = True
        options["clip_sample_range"] = min(bound.clip_sample_range, 1.0) if bound.clip_sample else 1.0
    return options


def _capped(sampler: StockSampler, cap: Any) -> StockSampler | None:
    """The stock sampler of a student with a capped input level (``Backbone.input_cap``, docs/CONDITIONING.md):
    LCMScheduler's timesteps above the cap become the cap's (the network reads the pipeline's x_t there, as the
    capped student does); None when two timesteps would merge or the scheduler is another one."""
    if sampler.scheduler != "LCMScheduler" or sampler.timesteps is None:
        return None
    timesteps = tuple(min(t, int(cap.timestep)) for t in sampler.timesteps)
    if len(set(timesteps)) != len(timesteps):
        return None
    note = f"{sampler.note}; timesteps above {int(cap.timestep)} read at {int(cap.timestep)} (capped input level)"
    return replace(sampler, timesteps=timesteps, note=note)


def plan_stock_export(hook: Any, ctx: RunContext, nets: Nets, sampling_networks: Sequence[str]) -> StockExport | str:
    """Ask the method how its sampler maps to a stock scheduler at each documented step count; return the stock
    export, or the reason (one sentence) why the export is a FewStepPipeline."""
    from fewstep.nn import unwrap
    from fewstep.sampling import sampling_net

    teacher, student = nets.teacher, unwrap(sampling_net(nets))
    pipeline = stock_pipeline(teacher)
    if pipeline is None:
        return (f"no stock diffusers pipeline takes a {'latent' if teacher.vae is not None else 'pixel'} "
                f"{type(teacher.net.model).__name__} teacher of the {teacher.family.name} family (stock pipelines: "
                f"ConsistencyModelPipeline for pixel UNet2DModels, "
                f"{', '.join(n for n in STOCK_PIPELINES if n != 'ConsistencyModelPipeline')} for latent teachers "
                "of their families)")
    if sampling_networks:
        return f"the sampler needs the extra networks {sorted(sampling_networks)}, which a stock pipeline cannot hold"
    if student.extra_channels:
        return ("the student reads extra input channels (self-conditioning or an initial velocity), which a stock "
                "diffusers model cannot take")
    default = int(ctx.config.export.steps)
    samplers: dict[int, StockSampler] = {}
    for n in export_steps(ctx):
        try:
            found = hook.fewstep_stock_sampler(ctx=ctx, nets=nets, num_steps=n)
        except ValueError:  # the method has no n-step sampler (e.g. off its nested grid)
            found = None
        if found is not None:
            samplers[n] = found
    cap = getattr(student, "input_cap", None)
    capped = ""  # said where the cap changed a sampler: the reason for a FewStepPipeline may be the cap
    if cap is not None:
        if any(t > cap.timestep for s in samplers.values() for t in (s.timesteps or ())):
            capped = (f"; the student has a capped input level (it reads timesteps above {int(cap.timestep)} at "
                      f"{int(cap.timestep)}, docs/CONDITIONING.md), set teacher.student_sigma_cap: none for an "
                      "uncapped student")
        samplers = {n: c for n, s in samplers.items() if (c := _capped(s, cap)) is not None}
    if default not in samplers:
        inputs = (f"; its student also reads the scalar inputs {list(student.extra_scalars)}, which no stock "
                  "diffusers model takes" if student.extra_scalars else "")
        return (f"method {ctx.method.name!r} declares no stock diffusers scheduler that reproduces its "
                f"{default}-step sampler with this teacher and student (hook fewstep_stock_sampler){inputs}{capped}")
    first = samplers[default]
    scalars = dict(first.scalars)
    varying = set(student.extra_scalars) - set(scalars)
    if varying:
        return (f"the student takes the scalar inputs {sorted(varying)}, which change between steps; a stock "
                "diffusers model cannot take them")
    if len(student.scalar_embeddings):
        try:
            _time_biases(student)
        except ValueError as err:
            return str(err)
    import diffusers

    scheduler_class = getattr(diffusers, first.scheduler)
    if pipeline.scales_input and not hasattr(scheduler_class, "scale_model_input"):
        return f"{pipeline.name} calls scale_model_input, which {first.scheduler} does not have"
    if not pipeline.scales_noise and getattr(scheduler_class.from_config(dict(first.config)), "init_noise_sigma", 1.0) != 1.0:
        return (f"{pipeline.name} does not scale its initial noise by the scheduler's init_noise_sigma, which "
                f"{first.scheduler} needs")
    same = {n: s for n, s in samplers.items()
            if s.scheduler == first.scheduler and dict(s.config) == dict(first.config) and dict(s.scalars) == scalars}
    config = {**first.config, **_teacher_scheduler_options(teacher, first.scheduler, first.config)}
    candidates = [config]
    if first.scheduler == "LCMScheduler":  # its own N-step schedule is drawn from original_inference_steps levels
        candidates += [{**config, "original_inference_steps": m} for m in sorted(same, reverse=True)]

    def reproduced(cand: dict[str, Any]) -> dict[int, StockSampler]:
        return {n: s for n, s in same.items() if _reproduces_schedule(s, cand, pipeline)}

    config = max(candidates, key=lambda c: (default in reproduced(c), len(reproduced(c))))
    kept = reproduced(config)
    embedded = getattr(student, "embedded_guidance", None)  # Flux-dev-style guidance embedding: the pipeline feeds it
    if embedded is not None:
        kept = {n: s if s.guidance_scale is not None else replace(s, guidance_scale=float(embedded))
                for n, s in kept.items()}
    if default not in kept:
        return (f"{pipeline.name} cannot pass the custom schedule of the {default}-step sampler to "
                f"{first.scheduler}, and the scheduler's own {default}-step schedule differs{capped}")
    if student.native_guidance:  # the UNet's time_cond_proj_dim reads the pipeline's guidance_scale: nothing to fold
        from fewstep.backbones import GUIDANCE_EMBED_SCALE

        scale = scalars.pop("w") / GUIDANCE_EMBED_SCALE
        kept = {n: replace(s, guidance_scale=scale) for n, s in kept.items()}
    return StockExport(pipeline, first.scheduler, config, kept, scalars, tuple(teacher.data_shape[1:]))


# ------------------------------------------------------------------------------------------------
# Writing an export


def _component(net: Any) -> str:
    return net.family.denoiser_component


def _teacher_index(teacher: Any) -> dict[str, Any]:
    index_file = Path(teacher.source) / "model_index.json"
    return json.loads(index_file.read_text()) if index_file.is_file() else {}


def _teacher_components(teacher: Any, skip: set[str]) -> dict[str, Any]:
    """The teacher folder's model_index.json entries of its other components (VAE, encoders, tokenizers...),
    or, for a teacher without one, those fewstep loaded."""
    index = _teacher_index(teacher)
    found = {k: v for k, v in index.items()
             if not k.startswith("_") and k not in skip and isinstance(v, list) and len(v) == 2 and v[0] is not None
             and (Path(teacher.source) / k).is_dir()}
    for name, library in (("vae", "diffusers"), ("text_encoder", "transformers"), ("tokenizer", "transformers")):
        module = getattr(teacher, name, None)
        if name not in found and module is not None:
            found[name] = [library, type(module).__name__]
    return found


def _has_fp16_variant(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*.fp16.safetensors")) or any(folder.glob("*.fp16.bin")))


def _write_student(student: Any, folder: Path, scalars: Mapping[str, float] | None, fp16: bool) -> None:
    """The student's diffusers model and fewstep's metadata, with the constant ``scalars`` folded in for a stock
    export (None: a FewStepPipeline, whose backbone embeds its scalars itself); an fp16 variant when asked."""
    import copy

    if scalars is not None and len(student.scalar_embeddings):
        student = copy.deepcopy(student)
        fold_scalars(student, scalars)
    student.save_pretrained(folder)
    if fp16:
        copy.deepcopy(student.model).half().save_pretrained(folder, variant="fp16", safe_serialization=True)


def write_export(ctx: RunContext, nets: Nets, out_dir: Path, *, student: nn.Module,
                 extra: dict[str, nn.Module] | None = None, stock: StockExport | None = None,
                 reason: str = "", metrics: dict[str, Any] | None = None) -> Path:
    """Write the export folder (layout in the module docstring) and return it.

    student: the sampling network (a Backbone). stock: the stock export (:func:`plan_stock_export`), or None for
    a FewStepPipeline, then with ``reason`` (why not stock, for the card) and ``extra`` (further sampling
    networks by name). metrics: the run's evaluation block, for the card."""
    import diffusers

    from fewstep.nn import unwrap

    teacher = nets.teacher
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    student = unwrap(student)
    name = stock.pipeline.component if stock is not None else _component(student)
    teacher_denoiser = Path(teacher.source) / _component(teacher.net)
    fp16 = _has_fp16_variant(teacher_denoiser)
    _write_student(student, out_dir / name, stock.scalars if stock is not None else None, fp16)
    process_config = teacher.process.scheduler_config()
    scheduler = {"_class_name": stock.scheduler, **stock.config} if stock is not None else process_config
    (out_dir / "scheduler").mkdir()
    sched_file = {**scheduler, "_diffusers_version": diffusers.__version__}
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_file, indent=2) + "\n")
    pipeline = stock.pipeline.name if stock is not None else "FewStepPipeline"
    index: dict[str, Any] = {
        "_class_name": pipeline if stock is not None else [PIPELINE_FILE, "FewStepPipeline"],
        "_diffusers_version": diffusers.__version__,
        name: ["diffusers", type(student.model).__name__],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    for component, entry in _teacher_components(teacher, {"unet", "transformer", "scheduler"}).items():
        source = Path(teacher.source) / component
        if source.is_dir():  # the teacher's own files, bit for bit (not its compute-dtype copy)
            shutil.copytree(source, out_dir / component)
        else:
            getattr(teacher, component).save_pretrained(out_dir / component)
        index[component] = entry
    if stock is not None:
        index.update(stock.pipeline.index)
        own = _teacher_index(teacher)
        if own.get("_class_name") == stock.pipeline.name:  # the teacher's own pipeline settings and empty slots
            index.update({k: v for k, v in own.items() if not k.startswith("_") and k not in index
                          and (not isinstance(v, list) or None in v)})
    else:
        (out_dir / f"{PIPELINE_FILE}.py").write_text(_SHIM)
        for extra_name, module in (extra or {}).items():
            unwrap(module).save_pretrained(out_dir / EXTRA_DIR / extra_name)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = ctx.config
    steps = int(cfg.export.steps)
    meta = {
        "format": _FORMAT,
        "method": cfg.method.name,
        "component": name,
        "pipeline": pipeline,
        "steps": steps,
        "stock": None if stock is None else {
            "scheduler": stock.scheduler,
            "calls": {str(n): stock.call_kwargs(n) for n in sorted(stock.samplers)},
            "notes": {str(n): s.note for n, s in sorted(stock.samplers.items())},
            "latents_scale": {str(n): s.latents_scale for n, s in sorted(stock.samplers.items())},
            "folded_scalars": dict(stock.scalars),
            "condition": stock.pipeline.condition,
            "renoise_generator": stock.pipeline.renoise_generator,
            "takes_latents": stock.pipeline.takes_latents,
            "batch_size": stock.pipeline.batch_size,
            "packed_noise": stock.pipeline.packed_noise,
        },
        "custom_reason": reason if stock is None else "",
        "fp16_variant": fp16,
        "sampling_networks": sorted(extra or {}) if stock is None else [],
        "process": process_config,
        "teacher": str(teacher.source),
        "teacher_name": teacher_name(teacher),
        "max_sequence_length": getattr(teacher.prompt_encoder, "max_sequence_length", None),
        "config": cfg.dump(),
        "metrics": metrics or {},
    }
    (out_dir / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(meta, teacher, out_dir.name))
    return out_dir


def teacher_name(teacher: Any) -> str:
    """The teacher's name for ``base_model``: the ``_name_or_path`` of its folder's model_index.json or its
    denoiser's config.json when that is a Hub-style id (never a local path), else the folder's name."""
    source = Path(teacher.source)
    for path in (source / "model_index.json", source / _component(teacher.net) / "config.json",
                 source / "config.json"):
        if path.is_file():
            named = json.loads(path.read_text()).get("_name_or_path")
            if isinstance(named, str) and named and not Path(named).is_absolute() and not named.startswith("."):
                if not Path(named).exists():
                    return named
    return source.name


# ------------------------------------------------------------------------------------------------
# The model card


def _condition_value(teacher: Any) -> str | None:
    """The Python literal of 4 conditions for the card's snippet (None: unconditional)."""
    if teacher.conditioning == "class":
        return repr([i % teacher.num_classes for i in range(4)])
    if teacher.conditioning == "text":
        return '["a photo of a cat"] * 4'
    return None


def loading_snippet(meta: dict[str, Any], teacher: Any, folder_name: str) -> str:
    """The Python snippet of the model card: load the export with diffusers and draw 4 images."""
    steps = meta["steps"]
    lines = ["import torch", "from diffusers import DiffusionPipeline", ""]
    stock = meta["stock"]
    if stock is None:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{folder_name}", trust_remote_code=True)')
        arg = "prompt" if teacher.conditioning == "text" else "class_labels"
        call = [f"num_inference_steps={steps}"]
    else:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{folder_name}")')
        arg = stock["condition"]
        call = [f"{k}={v!r}" for k, v in stock["calls"][str(steps)].items()]
    cond = _condition_value(teacher)
    call.insert(0, "batch_size=4" if cond is None else f"{arg}={cond}")
    if cond is not None and stock is not None and stock["batch_size"]:
        call.insert(0, "batch_size=4")
    call.append("generator=torch.Generator().manual_seed(0)")
    lines.append(f"images = pipe({', '.join(call)}).images")
    lines.append('images[0].save("sample.png")')
    return "\n".join(lines)


def model_card(meta: dict[str, Any], teacher: Any, folder_name: str) -> str:
    """The model card in the Hub's format: YAML header, what the student is, the loading snippet, the steps and
    guidance to use, why a custom pipeline (where it is one), the measured metrics and the resolved recipe."""
    import yaml

    method, steps, stock = meta["method"], meta["steps"], meta["stock"]
    task = "text-to-image" if teacher.conditioning == "text" else "unconditional-image-generation"
    header = {
        "library_name": "diffusers",
        "base_model": meta["teacher_name"],
        "tags": ["fewstep", "distillation", "few-step", method, meta["pipeline"]],
        # The Hub has no class-conditional task; DiT checkpoints there are listed as unconditional [unverified].
        "pipeline_tag": task,
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {meta['teacher_name']} distilled to {steps} step{'s' if steps > 1 else ''} with `{method}`", "",
             f"A few-step generator distilled by fewstep with the `{method}` method "
             f"from the teacher `{meta['teacher_name']}` ({teacher.process.describe()}; conditioning: "
             f"{teacher.conditioning}).", "",
             f"![samples]({SAMPLES_FILE})", "",
             f"`{SAMPLES_FILE}`: samples at {steps} step{'s' if steps > 1 else ''} from fewstep's sampler (the "
             "pipeline below draws the same images for the same noise).", "",
             "## Sampling", "", "```python", loading_snippet(meta, teacher, folder_name), "```", ""]
    if stock is not None:
        lines += [f"A stock `{meta['pipeline']}` with the stock `{stock['scheduler']}`: it needs only diffusers. "
                  "Each row gives the call arguments that reproduce fewstep's sampler at that number of steps "
                  "(at other step counts the scheduler's own schedule is not fewstep's sampler):", "",
                  "| steps | call arguments | what the scheduler does |", "|---|---|---|"]
        lines += [f"| {n} | `{', '.join(f'{k}={v!r}' for k, v in kwargs.items())}` | {stock['notes'][n]} |"
                  for n, kwargs in stock["calls"].items()]
        lines.append("")
        if stock["folded_scalars"]:
            lines += [f"The student's extra inputs are fixed at {stock['folded_scalars']} (the values fewstep samples "
                      "with), folded into the time embedding: the pipeline's `guidance_scale` does not change them, "
                      "and classifier-free guidance must stay off.", ""]
        scale = stock["latents_scale"][str(steps)]
        if scale != 1.0:
            lines += [f"fewstep's sampler starts at the teacher's largest noise level, {scale:.6g} times unit noise for "
                      f"this teacher: the pipeline's image for `latents=L` is fewstep's image for the noise "
                      f"L / {scale:.6g} (its starting noise is {(1 - scale) * 100:.3g}% smaller than the pipeline's).", ""]
        if stock["packed_noise"] and any(int(n) > 1 for n in stock["calls"]):
            lines += [f"`{meta['pipeline']}` draws the re-noising noise of multistep sampling in its packed token "
                      "layout: the same sampler as fewstep's, but for more than one step not the same image for "
                      "one seed.", ""]
        if not stock["renoise_generator"]:
            lines += [f"`{meta['pipeline']}` does not pass `generator` to the scheduler: multistep sampling re-noises "
                      "with torch's global generator (seed it with `torch.manual_seed`).", ""]
    else:
        lines += [f"A custom `FewStepPipeline` (fewstep's own sampler of the method), because {meta['custom_reason']}. "
                  "It needs `pip install fewstep` (and the method's plugin when it is not built in); "
                  f"`num_inference_steps` defaults to {steps}.", ""]
    if meta.get("fp16_variant"):
        lines += ["Half-precision weights: `DiffusionPipeline.from_pretrained(..., variant=\"fp16\", "
                  "torch_dtype=torch.float16)`.", ""]
    evaluation = meta["metrics"]
    rows = {k: v for k, v in evaluation.items() if isinstance(v, dict)}
    if rows:
        lines += [f"## Metrics (n = {evaluation.get('num')}, against {evaluation.get('reference')})", "",
                  "| row | FID | precision | recall | samples/s |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['fid']:.2f} | {v['precision']:.3f} | {v['recall']:.3f} | {v['samples_per_s']} |"
                  for k, v in rows.items()]
        lines.append("")
    else:
        lines += ["## Metrics", "", "Not measured: the run had no `eval.reference` (`fewstep eval RUN` measures it).", ""]
    lines += ["## Recipe (resolved)", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)


def card_snippet(readme: str) -> str:
    """The first Python code block of a model card (what the card tells users to run)."""
    start = readme.index("```python\n") + len("```python\n")
    return readme[start: readme.index("```", start)]


# ------------------------------------------------------------------------------------------------
# Running an export


def export_run(hook: Any, ctx: RunContext, nets: Nets, out_dir: Path) -> Path:
    """Ask the run's plugins for the sampling networks and the stock mapping of the sampler, write the export
    through ``fewstep_export``, print why it is a custom pipeline where it is one, and draw its sample grid."""
    names = sorted({n for found in hook.fewstep_sampling_networks(ctx=ctx) for n in (found or [])})
    plan = plan_stock_export(hook, ctx, nets, names)
    stock = plan if isinstance(plan, StockExport) else None
    out = hook.fewstep_export(ctx=ctx, nets=nets, out_dir=Path(out_dir), sampling_networks=names, stock=stock,
                              reason="" if stock is not None else plan)
    out = Path(out)
    if ctx.is_main and (out / EXPORT_META).is_file():
        if stock is None:
            print(f"export {out}: a custom FewStepPipeline (needs fewstep to load), because {plan}")
        if nets.teacher.net.image_channels:  # its samples need condition images, which an export does not hold
            print(f"export {out}: no {SAMPLES_FILE}: the student is image-conditioned (Cond.image); the run's "
                  "validation grids show it on conditions made from the data")
        else:
            write_sample_grid(hook, ctx, nets, out)
    return out


def write_sample_grid(hook: Any, ctx: RunContext, nets: Nets, out: Path, num: int = 8) -> Path:
    """``samples.png``: ``num`` samples at the export's default steps from fewstep's sampler (fixed seed)."""
    from fewstep.images import save_grid
    from fewstep.sampling import generate

    teacher = nets.teacher
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((num, *teacher.sample_shape), generator=g).to(ctx.device)
    if teacher.conditioning == "class":
        cond: Cond | None = Cond(labels=torch.arange(num, device=ctx.device) % teacher.num_classes)
    elif teacher.conditioning == "text":
        cond = teacher.encode_prompts(["a photo of a cat"] * num)
    else:
        cond = None
    images = generate(hook, ctx, nets, noise, cond, int(ctx.config.export.steps), generator=g)
    return save_grid(images, out / SAMPLES_FILE, nrow=num // 2 if num > 4 else num)


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """The evaluation block of a run's summary.json (empty when the run was not evaluated)."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()).get("eval", {}) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------
# Reading an export back


@dataclass
class LoadedExport:
    """An export rebuilt for sampling: the run's plugin manager, context and networks."""

    hook: Any
    ctx: RunContext
    nets: Nets
    meta: dict[str, Any]


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fewstep export: {EXPORT_META} is missing (make one with "
                                "`fewstep export RUN OUT`)")
    return json.loads(path.read_text())


def load_export(folder: str | Path, *, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32, modules: dict[str, nn.Module] | None = None) -> LoadedExport:
    """Rebuild the sampling networks of an export with the method's plugin (for ``fewstep sample`` and
    :class:`FewStepPipeline`). ``modules``: components already loaded by diffusers (reused, not reloaded)."""
    from fewstep.backbones import Backbone
    from fewstep.config import validate_config
    from fewstep.diffusion import process_from_scheduler_config
    from fewstep.plugin import build_manager, discover, method_registry
    from fewstep.teacher import Teacher

    folder = Path(folder).expanduser().resolve()
    meta = _read_meta(folder)
    plugins = discover()
    config = validate_config(meta["config"], method_registry(plugins), source=str(folder / EXPORT_META))
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable,
                       plugins=plugins)
    modules = modules or {}
    component = meta["component"]
    if modules.get(component) is not None:
        student = Backbone.wrap(modules[component], folder / component)
    else:
        student = Backbone.from_pretrained(folder / component)
    if meta.get("stock") is not None and len(student.scalar_embeddings):  # a stock model holds them folded
        fold_scalars(student, meta["stock"]["folded_scalars"], sign=-1.0)
    extra = {name: Backbone.from_pretrained(folder / EXTRA_DIR / name) for name in meta["sampling_networks"]}
    family = student.family
    wanted = ["vae", *(n for pair in (*family.text_components, *family.optional_text_components) for n in pair)]
    if family.prompt_encoder == "pipeline":
        wanted.append("scheduler")  # the stock pipeline built in memory to encode prompts needs one
    index = json.loads((folder / "model_index.json").read_text())
    loaded: dict[str, Any] = {}
    for name in wanted:
        entry = index.get(name)
        if modules.get(name) is not None:
            loaded[name] = modules[name]
        elif isinstance(entry, list) and len(entry) == 2 and entry[0] and (folder / name).is_dir():
            import importlib

            loaded[name] = getattr(importlib.import_module(entry[0]), entry[1]).from_pretrained(
                folder / name, local_files_only=True)
    device = torch.device(device) if device is not None else torch.device("cpu")
    prompt_encoder = None
    if family.prompt_encoder is not None and "text_encoder" in loaded and "tokenizer" in loaded:
        from fewstep.families import PromptEncoder

        vae = loaded.get("vae")
        factor = 1
        if vae is not None:
            blocks = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
            factor = 2 ** (len(blocks) - 1)
        prompt_encoder = PromptEncoder(family, {family.denoiser_component: student.model, **loaded},
                                       (student.sample_size * factor,) * 2, index=index,
                                       max_sequence_length=meta.get("max_sequence_length"))
    # Sampling needs the teacher's process, VAE and text encoders, never its weights: the stand-in
    # teacher holds the student's network (no second copy).
    standin = Teacher(student, process_from_scheduler_config(meta["process"]), source=Path(meta["teacher"]),
                      device=device, dtype=dtype, vae=loaded.get("vae"), text_encoder=loaded.get("text_encoder"),
                      tokenizer=loaded.get("tokenizer"), prompt_encoder=prompt_encoder, components=loaded)
    for net in extra.values():
        net.to(device, dtype).eval().requires_grad_(False)
    ctx = RunContext(method=config.method, config=config, device=device, dtype=dtype, run_dir=folder,
                     seed=config.train.seed)
    return LoadedExport(pm.hook, ctx, Nets(standin, student, extra), meta)


def condition(teacher: Any, n: int, class_labels: Any = None, prompt: Any = None) -> Cond | None:
    """The Cond of ``n`` samples for the teacher's conditioning from user inputs (labels or prompts)."""
    if teacher.conditioning == "class":
        if class_labels is None:
            raise ValueError(f"this student is class-conditional ({teacher.num_classes} classes): pass class_labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1 and n > 1:
            labels = labels.expand(n)
        if len(labels) != n or bool(((labels < 0) | (labels >= teacher.num_classes)).any()):
            raise ValueError(f"class_labels must be {n} labels in [0, {teacher.num_classes}), got {labels.tolist()}")
        return Cond(labels=labels.to(teacher.device))
    if teacher.conditioning == "text":
        if prompt is None:
            raise ValueError("this student is text-conditional: pass prompt (a string or a list of strings)")
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} samples")
        return teacher.encode_prompts(prompts)
    if class_labels is not None or prompt is not None:
        raise ValueError("this student is unconditional: do not pass class_labels or prompt")
    return None


class FewStepPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Few-step sampling of a fewstep export with the method's own sampler.

    ``pipe(num_inference_steps=None, batch_size=1, class_labels=None, prompt=None, generator=None,
    latents=None, output_type="pil")``: ``num_inference_steps`` defaults to the export's steps; the batch
    size follows ``class_labels`` / ``prompt`` when given; ``latents`` (B, C, H, W) is the model-space
    noise (drawn from ``generator`` when None; the same generator seeds any noise the sampler adds).

    LoRA exports (docs/LORA.md): ``FewStepPipeline.from_pretrained(OUT, unet=<the teacher's UNet, or a
    fine-tune's>)`` then ``pipe.load_lora_weights(OUT)`` samples the adapter on that base with the method's sampler.
    """

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                            "tokenizer_2", "text_encoder_3", "tokenizer_3"]

    def __init__(self, scheduler: Any, unet: Any = None, transformer: Any = None, vae: Any = None,
                 text_encoder: Any = None, tokenizer: Any = None, text_encoder_2: Any = None,
                 tokenizer_2: Any = None, text_encoder_3: Any = None, tokenizer_3: Any = None) -> None:
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self._loaded: LoadedExport | None = None
        self._lora_scalars: dict[str, Tensor] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FewStepPipeline:
        """Load an export folder. The folder's ``pipeline_fewstep.py`` only re-exports this class, so loading
        through it needs no trust beyond importing fewstep: ``trust_remote_code`` defaults to True here
        (``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` is the diffusers spelling)."""
        kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _export(self) -> LoadedExport:
        device = self.device
        if self._loaded is None or self._loaded.ctx.device != device:
            folder = getattr(self.config, "_name_or_path", None)
            if folder is None:
                raise ValueError("FewStepPipeline must be loaded from an export folder with from_pretrained")
            modules = {k: getattr(self, k, None) for k in self._optional_components}
            self._loaded = load_export(folder, device=device, dtype=self.dtype, modules=modules)
            if self._lora_scalars is not None:
                self._loaded.nets.student.scalar_embeddings.load_state_dict(self._lora_scalars)
        return self._loaded

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path | dict[str, Tensor],
                          adapter_name: str | None = None, **kwargs: Any) -> None:
        """diffusers' LoRA loader for a fewstep LoRA export (``pytorch_lora_weights.safetensors``) into the denoiser:
        a UNet through ``StableDiffusionLoraLoaderMixin.load_lora_weights``, a transformer through its own
        ``load_lora_adapter`` (prefix ``transformer``), or :func:`fewstep.lora.load_lora` where it has none (DiT,
        PixArt). A folder's ``fewstep_lora_scalars.safetensors`` (the adapter's extra scalar embeddings, e.g. CTM's
        s) replaces the student's."""
        from fewstep.lora import LORA_WEIGHTS, SCALARS_FILE, load_lora

        if self.unet is not None:
            super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        elif hasattr(self.transformer, "load_lora_adapter"):
            self.transformer.load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix="transformer",
                                               adapter_name=adapter_name, **{"weight_name": LORA_WEIGHTS, **kwargs})
        else:
            load_lora(self.transformer, pretrained_model_name_or_path_or_dict, adapter_name or "default")
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            scalars = Path(pretrained_model_name_or_path_or_dict) / SCALARS_FILE
            if scalars.is_file():
                from safetensors.torch import load_file

                self._lora_scalars = load_file(str(scalars))
        self._loaded = None  # rebuilt on the next call, around the adapted denoiser

    @torch.no_grad()
    def __call__(self, num_inference_steps: int | None = None, batch_size: int = 1, class_labels: Any = None,
                 prompt: Any = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        from fewstep.sampling import generate

        run = self._export()
        teacher = run.nets.teacher
        steps = num_inference_steps or int(run.meta["steps"])
        if class_labels is not None:
            batch_size = len(torch.as_tensor(class_labels).reshape(-1))
        elif prompt is not None and not isinstance(prompt, str):
            batch_size = len(prompt)
        cond = condition(teacher, batch_size, class_labels, prompt)
        if latents is None:
            latents = torch.randn((batch_size, *teacher.sample_shape), generator=generator)
        images = generate(run.hook, run.ctx, run.nets, latents.to(run.ctx.device).float(), cond, steps,
                          generator=generator)
        images = (images.clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            out: Any = images
        else:
            array = images.permute(0, 2, 3, 1).numpy()
            out = self.numpy_to_pil(array) if output_type == "pil" else array
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def edit(self, image: Tensor, task: str, num_inference_steps: int = 2, mask: Tensor | None = None,
             factor: int = 2, strength: float = 0.5, class_labels: Any = None, prompt: Any = None,
             generator: torch.Generator | None = None, num_frames: int = 8) -> Tensor:
        """Zero-shot editing with the export's consistency-type student (``fewstep.editing``, CM Algorithm 4).

        image: (B, C, H, W) in [-1, 1]; task: inpaint (``mask`` 1 = known), colorize, superres (``factor``),
        sdedit (``strength``), interpolate (``num_frames``) or img2img (``strength`` as diffusers' image-to-image
        pipelines, optional ``mask`` as their inpainting). Returns images (B, C, H, W) in [-1, 1]."""
        from fewstep.editing import edit

        run = self._export()
        n = num_frames if task == "interpolate" else image.shape[0]
        cond = condition(run.nets.teacher, n, class_labels, prompt)
        return edit(run.hook, run.ctx, run.nets, task, image, num_inference_steps, mask=mask, factor=factor,
                    strength=strength, cond=cond, generator=generator, num_frames=num_frames)
