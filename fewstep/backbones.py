"""One calling convention over the diffusers denoisers fewstep distils.

:class:`Backbone` wraps a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` or
``DiTTransformer2DModel`` (and the transformers of SD3, Flux, PixArt and Sana) behind
``backbone(x, timestep, cond, **scalars) -> (B, C, H, W)``, so the diffusion maths
(``fewstep/diffusion.py``) and every method plugin call them all the same way. What differs per
teacher family (which Cond fields feed which model input, Flux's packed latents and position ids,
the time-embedding seam, the bottleneck block) is read from the family's row in
:mod:`fewstep.families`; Flux latents are packed into 2x2 tokens and unpacked here, so callers
always pass and get (B, C, H, W) latents.

Extra scalar inputs. Several methods condition the student on a scalar the teacher never saw: the
target time ``s`` of CTM and flow maps, the guidance scale ``w`` of guided / LCM-style distillation.
:meth:`Backbone.add_scalar_inputs` adds one embedding per scalar, built like the backbone's own time
embedding (sinusoidal features -> Linear -> SiLU -> Linear) with the last Linear zero-initialised,
and adds its output to the backbone's time embedding through forward hooks. At step 0 the student is
therefore exactly its teacher. The backbone embeds whatever float it is given, with the same
sinusoidal features (same width, frequencies and flip) as its timesteps: the caller maps a scalar
to a sensible range first (by convention the target time ``s`` is given in the same model-time units
as ``timestep``, e.g. ``NoiseProcess.model_time(s)``; a guidance scale ``w`` is given as is).

Native guidance input. A ``UNet2DConditionModel`` (SD, SDXL) takes ``w`` the diffusers way instead
(LCM's UNets): ``time_embedding.cond_proj`` (zero-initialised, so again the student starts as its
teacher) reads :func:`guidance_scale_embedding` of ``w - 1`` through ``timestep_cond``, and the model
config records ``time_cond_proj_dim``, so a stock StableDiffusion(XL)Pipeline feeds it its
``guidance_scale`` (and then turns classifier-free guidance off).

Extra input channels. Self-conditioning (Analog Bits: the model's previous x0 estimate) and CAF's
initial-velocity conditioning feed a second image next to x. :meth:`Backbone.add_input_channels`
widens the first convolution (``conv_in`` of the UNets, the patch embedding of DiT) with zero
weights, so the network ignores the new channels until it is trained: again, the student starts
as its teacher. ``forward(..., extra_input=(B, k, H, W))`` concatenates them (zeros when omitted).

Condition image. An image-conditioned model (a LowDiff stage reading the previous stage's output up-sampled, a
super-resolution teacher reading its low-resolution input) takes its condition image from ``Cond.image``: the first
``image_channels`` of the extra input channels (:meth:`Backbone.add_image_channels`, zero-initialised like the
others), so the input is [x, Cond.image, extra_input] along channels. Unlike ``extra_input`` the image is required:
a backbone with image channels called without ``Cond.image`` raises, as it would for missing labels. Because it
travels in ``Cond``, every method's ``process.denoise(net, x, sigma, cond)`` hands it to teacher and student alike.

Scalar defaults. A declared scalar left out of a call counts as 0 unless :meth:`Backbone.set_scalar_default` gave it
another value: a LowDiff stage teacher fixes its ``stage`` input that way, so a method that knows nothing of
stages calls it (and the student copied from it) at its own stage.

Student conditioning (docs/CONDITIONING.md). An epsilon-prediction VP teacher reads x0 = (x_t - s eps)/a, which
multiplies the network's error by sigma = s/a: ~157 at t = 999 of DDPM's linear betas. A student copied from such
a teacher gets a capped input level (:meth:`Backbone.cap_input_level`, chosen by :func:`student_sigma_cap`): above
sigma_cap the network is evaluated at the cap's timestep on the same input, and its output is converted back to
the caller's timestep, so the student's x0 error is at most sigma_cap times its network's error at every level
and the student equals its teacher at every level up to the cap.

Bottleneck features. :meth:`Backbone.bottleneck` returns the encoder's output (the UNets' mid block,
DiT's last transformer block as a (B, D, H/p, W/p) map) without running the decoder: the feature
map DMD2's GAN head and the diffusion discriminators of fewstep.gan classify. :meth:`Backbone.features`
returns one map per level (the UNets' mid and up blocks, every transformer block): LADD's heads.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fewstep.diffusion import AUTO_CAP_SIGMA, MAX_X0_GAIN, cap_timestep, student_sigma_cap, x0_gain  # noqa: F401 - re-exported
from fewstep.families import Family, family_for_model
from fewstep.types import Cond

__all__ = ["AUTO_CAP_SIGMA", "FLUX_DEFAULT_GUIDANCE", "GUIDANCE_EMBED_SCALE", "MAX_X0_GAIN", "SUPPORTED_MODELS",
           "Backbone", "InputCap",
           "ScalarEmbedding", "condition_student", "enable_gradient_checkpointing", "flux_image_ids", "guidance_inputs",
           "guidance_scale_embedding", "pack_latents", "student_sigma_cap", "unpack_latents", "x0_gain"]

# diffusers class name -> (Backbone.kind, class)
SUPPORTED_MODELS: dict[str, tuple[str, type[nn.Module]]] = {
    "UNet2DModel": ("unet2d", UNet2DModel),
    "UNet2DConditionModel": ("unet2d_condition", UNet2DConditionModel),
    "DiTTransformer2DModel": ("dit", DiTTransformer2DModel),
    "SD3Transformer2DModel": ("sd3", SD3Transformer2DModel),
    "FluxTransformer2DModel": ("flux", FluxTransformer2DModel),
    "PixArtTransformer2DModel": ("pixart", PixArtTransformer2DModel),
    "SanaTransformer2DModel": ("sana", SanaTransformer2DModel),
}

#: The value a Flux backbone with a guidance embedding (``guidance_embeds``) is fed when the Cond carries
#: none: FluxPipeline's default ``guidance_scale``, so a student exported into a stock FluxPipeline called
#: with its defaults sees what it was trained with. A teacher fed an explicit scale uses that instead.
FLUX_DEFAULT_GUIDANCE = 3.5

#: A guidance scale w is fed to a student's zero-initialised scalar input ``w`` as w * 100, through the
#: backbone's timestep sinusoid (whose usual inputs span 0..1000): one convention for every method.
GUIDANCE_EMBED_SCALE = 100.0

#: Width of the guidance-scale features of a native guidance input (``time_cond_proj_dim``): 256, the
#: LatentConsistencyModelPipeline's UNets' value (LCM's w_embedding_dim default; unverified for other checkpoints).
GUIDANCE_COND_DIM = 256

BACKBONE_META = "fewstep_backbone.json"
EXTRA_WEIGHTS = "fewstep_extra.safetensors"


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"unsupported backbone class {name!r}; fewstep supports {', '.join(SUPPORTED_MODELS)} "
        "(a diffusers model folder's config.json names its class in '_class_name')"
    )


def condition_student(config: Any, teacher: Any, student: nn.Module, announce: bool = True) -> float | None:
    """Apply the run's student conditioning to a freshly built student (the trainer calls this between
    ``fewstep_build_student`` and the extra networks, so targets, EMAs and fake scores copied from the student
    share it); returns the capped level or None.

    The cap is ``teacher.student_sigma_cap`` resolved by :func:`student_sigma_cap`. Not applied: to methods whose
    config sets ``conditions_student = False`` (teacher training regresses the raw output), to students that are
    no :class:`Backbone`, and to LoRA students (their adapter views are rebuilt from the shared base; an explicit
    level is refused there, "auto" leaves them uncapped and says so on stderr when ``announce``)."""
    setting = config.teacher.student_sigma_cap
    if not getattr(type(config.method), "conditions_student", True) or not isinstance(student, Backbone):
        return None
    sigma = student_sigma_cap(teacher.process, setting)
    if sigma is not None and config.lora is not None:
        if setting == "auto":
            if announce:
                print(f"fewstep: note: this teacher's top level amplifies x0 errors "
                      f"{x0_gain(teacher.process, teacher.process.sigma_max):.0f}x (teacher.student_sigma_cap: auto "
                      f"would cap a full student at sigma {sigma:g}), but a LoRA student shares the teacher's input "
                      "levels, so it stays uncapped and inherits that conditioning at the top level; where the "
                      "method has a generator level (method.sigma_max) keep it below the top, or train a full "
                      "student (docs/CONDITIONING.md)", file=sys.stderr, flush=True)
            return None
        raise ValueError(f"teacher.student_sigma_cap={setting}: a LoRA student cannot take a capped input level; "
                         "remove the lora section or set teacher.student_sigma_cap to 'auto' or 'none'")
    student.cap_input_level(teacher.process, sigma)
    return None if student.input_cap is None else student.input_cap.sigma


class InputCap:
    """A student's capped input level (docs/CONDITIONING.md) on a VP process: the timestep of the cap and the
    conversion of a network output read at the cap's timestep to the caller's.

    process: the teacher's VP process. sigma: the requested sigma-space cap; the cap is the integer timestep
    floor(t(sigma)), so stock discrete schedulers can evaluate it, and ``sigma`` becomes its level (<= the
    requested one)."""

    def __init__(self, process: Any, sigma: float) -> None:
        if process.kind != "vp":
            raise ValueError(f"InputCap: only VP processes have a timestep cap, got {process.describe()}")
        self.process = process
        t = cap_timestep(process, sigma)
        self.timestep = t
        self.sigma = float(process.t_to_sigma(torch.tensor([t], dtype=torch.float64)))

    def config(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "scheduler": self.process.scheduler_config()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> InputCap:
        from fewstep.diffusion import process_from_scheduler_config

        return cls(process_from_scheduler_config(cfg["scheduler"]), float(cfg["sigma"]))

    def timesteps(self, t: Tensor) -> Tensor:
        """(B,) process timesteps -> the ones the network is fed: min(t, cap)."""
        return t.clamp(max=self.timestep)

    def convert(self, out: Tensor, x_t: Tensor, t: Tensor, t_net: Tensor) -> Tensor:
        """The output at timestep ``t`` (B,) that means the x0 the network's ``out`` means at ``t_net`` (B,), for
        the network input x_t (B, C, H, W); float32 at least (a half-precision round trip through epsilon at
        t = 999 would lose the x0 the cap protects). Samples below the cap are returned unchanged."""
        work = torch.promote_types(out.dtype, torch.float32)
        out_w, x_w = out.to(work), x_t.to(work)
        x0 = self.process.x0_from_output(out_w, x_w, t_net)
        moved = self.process.output_from_x0(x0, x_w, t)
        over = (t > t_net).reshape(-1, *([1] * (out.ndim - 1)))
        return torch.where(over, moved, out_w)


class _Bottleneck(Exception):
    """Raised by the forward hook of :meth:`Backbone.bottleneck` / :meth:`Backbone.features` to skip the rest of the
    forward pass."""


class ScalarEmbedding(nn.Module):
    """Sinusoidal features of a (B,) scalar -> Linear -> SiLU -> Linear (zero-initialised).

    ``proj`` copies the backbone's timestep features (width, frequency shift, flip), ``mlp`` is a
    diffusers ``TimestepEmbedding`` whose ``linear_2`` weight and bias start at zero, so the module
    outputs exact zeros until it is trained.
    """

    def __init__(self, proj: Timesteps, out_dim: int) -> None:
        super().__init__()
        self.proj = Timesteps(proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale)
        self.mlp = TimestepEmbedding(proj.num_channels, out_dim)
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)

    def forward(self, value: Tensor) -> Tensor:
        """value: (B,) float -> (B, out_dim)."""
        return self.mlp(self.proj(value).to(self.mlp.linear_1.weight.dtype))


class Backbone(nn.Module):
    """One call for diffusers UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel and the SD3, Flux,
    PixArt and Sana transformers.

    model: the wrapped diffusers model. kind: "unet2d" | "unet2d_condition" | "dit" | "sd3" | "flux" |
        "pixart" | "sana". family: its row of fewstep.families (SD and SDXL share a kind, not a family).
    sample_size: the latent (or pixel) size; from the config, or given (Flux's config has none).
    embedded_guidance: for Flux with ``guidance_embeds``, the scale fed when a Cond carries none.
    in_channels / out_channels: data channels. A model predicting twice its input channels (learned
        variance, e.g. DiT with learned sigma) reports ``out_channels == in_channels`` and
        :meth:`forward` keeps the first half of its output (the mean prediction).
    num_classes: number of real classes; the null (unconditional) label is ``num_classes``. Defaults:
        UNet with ``num_class_embeds``: ``num_class_embeds`` (no null slot; a fewstep teacher stores
        ``num_classes + 1`` embeddings and records ``num_classes`` in its metadata, so pass it);
        DiT: ``num_embeds_ada_norm`` (diffusers adds the null row after the real classes).
    conditioning: "none" | "class" | "text".

    The DiT label embedder drops labels at random in training mode (its ``class_dropout_prob``);
    fewstep turns that off on wrapping, because label dropout for guidance is decided by the data
    pipeline (null labels in ``Cond``), and a network that silently changes its inputs would make
    online and target passes disagree.
    """

    def __init__(
        self, model: nn.Module, extra_scalars: Sequence[str] = (), *, num_classes: int | None = None,
        extra_channels: int = 0, self_conditioning: bool = False, sample_size: int | None = None,
        family: str | None = None, image_channels: int = 0, scalar_defaults: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        name = type(model).__name__
        if name not in SUPPORTED_MODELS or not isinstance(model, SUPPORTED_MODELS[name][1]):
            raise _unsupported(name)
        self.model = model
        self.kind: str = SUPPORTED_MODELS[name][0]
        cfg = model.config
        #: the teacher family (fewstep.families): how inputs are assembled and where the scalar seam is.
        #: ``family`` names it when the class alone is ambiguous (PixArt-alpha vs -sigma).
        own = dict(cfg)  # the config without fewstep's own extra input channels (see add_input_channels)
        if extra_channels and own.get("in_channels") is not None:
            packed = 4 if name == "FluxTransformer2DModel" else 1
            own["in_channels"] = int(own["in_channels"]) - int(extra_channels) * packed
        detected = family_for_model(name, own)
        if family is not None and family != detected.name:
            from fewstep.families import FAMILIES

            if family not in FAMILIES or FAMILIES[family].denoiser_class != name:
                raise ValueError(f"family {family!r} does not describe a {name}; detected {detected.name!r}")
            detected = FAMILIES[family]
        self.family: Family = detected
        # Flux reads 2x2 patches of the latents as tokens: its config counts 4x the latent channels.
        self._pack = 2 if self.family.packed_latents else 1
        #: channels of the extra input images (see add_input_channels), condition image included; the data has
        #: in_channels
        self.extra_channels: int = int(extra_channels)
        #: how many of the extra channels (the first ones) are read from Cond.image (see add_image_channels)
        self.image_channels: int = int(image_channels)
        if not 0 <= self.image_channels <= self.extra_channels:
            raise ValueError(f"image_channels={image_channels} must lie in [0, extra_channels={extra_channels}]: the "
                             "condition image is part of the extra input channels")
        self.in_channels: int = int(cfg.in_channels) // self._pack**2 - self.extra_channels
        #: the extra input is the model's own previous x0 estimate (Analog Bits; see fewstep.selfcond)
        self.self_conditioning: bool = bool(self_conditioning)
        if self.self_conditioning and self.extra_channels - self.image_channels != self.in_channels:
            raise ValueError(f"a self-conditioned backbone takes its x0 estimate as {self.in_channels} extra input "
                             f"channels, but this one has {self.extra_channels - self.image_channels}")
        model_out = int(cfg.out_channels) if cfg.out_channels is not None else int(cfg.in_channels)
        model_out //= self._pack**2
        self._model_out_channels = model_out
        self.out_channels: int = self.in_channels if model_out == 2 * self.in_channels else model_out
        size = sample_size if sample_size is not None else cfg.get("sample_size", self.family.default_sample_size)
        if size is None:
            raise ValueError(f"{name} has no sample_size in its config; pass the latent size as sample_size")
        self.sample_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        #: Flux with a guidance embedding: the scale fed when a Cond carries none (FLUX_DEFAULT_GUIDANCE).
        self.embedded_guidance: float | None = (
            FLUX_DEFAULT_GUIDANCE if self.kind == "flux" and cfg.guidance_embeds else None
        )

        label_rows: int | None = None
        if self.kind in ("sd3", "flux", "pixart", "sana"):
            self.conditioning = "text"
            default_classes = None
        elif self.kind == "dit":
            self.conditioning = "class"
            default_classes: int | None = int(cfg.num_embeds_ada_norm)
            for block in model.transformer_blocks:
                block.norm1.emb.class_embedder.dropout_prob = 0.0
            label_rows = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        else:
            has_labels = getattr(model, "class_embedding", None) is not None
            if has_labels and cfg.class_embed_type is not None:
                raise ValueError(
                    f"{name} with class_embed_type={cfg.class_embed_type!r} is not supported; fewstep "
                    "supports integer class labels through num_class_embeds (class_embed_type=None)"
                )
            default_classes = int(cfg.num_class_embeds) if has_labels else None
            label_rows = default_classes
            self.conditioning = (
                "text" if self.kind == "unet2d_condition" else ("class" if has_labels else "none")
            )
        if num_classes is not None and (label_rows is None or num_classes > label_rows):
            raise ValueError(
                f"num_classes={num_classes} but the {name} has {label_rows or 0} label embeddings; "
                "num_classes counts real classes only (the null label is num_classes)"
            )
        self.num_classes: int | None = num_classes if num_classes is not None else default_classes
        self._label_rows = label_rows

        self.extra_scalars: tuple[str, ...] = ()
        #: the value of a declared scalar left out of a call (0 when not listed; see set_scalar_default)
        self.scalar_defaults: dict[str, float] = {}
        self.scalar_embeddings = nn.ModuleDict()
        # Extra embedding of the forward in progress. For DiT the blocks' embedders may run again
        # during backward (gradient checkpointing recomputes them), possibly after another forward:
        # there the embedding is looked up by the timestep tensor that forward handed to the model.
        self._current_extra: Tensor | None = None
        self._extra_by_timestep = WeakIdKeyDictionary()
        self._hooked = False
        #: the student's capped input level (docs/CONDITIONING.md), or None (every teacher: none)
        self.input_cap: InputCap | None = None
        if extra_scalars:  # a model loaded with time_cond_proj_dim holds a native guidance input (module docstring)
            self.add_scalar_inputs(extra_scalars, native_guidance=cfg.get("time_cond_proj_dim") is not None)
        for name, value in (scalar_defaults or {}).items():
            self.set_scalar_default(name, value)

    @property
    def has_null_class(self) -> bool:
        """Whether label ``num_classes`` (the null class for guidance) has an embedding."""
        return (
            self.num_classes is not None
            and self._label_rows is not None
            and self._label_rows > self.num_classes
        )

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype of the diffusers model's first floating parameter. ``ModelMixin.dtype`` walks every submodule
        on each call (1.4 ms per call on the digits UNet, issue 15); a cached value would go stale under
        ``torch.func.functional_call`` with parameters of another dtype (the float64 JVP reference does that)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def output_layer(self) -> nn.Module:
        """The denoiser's last layer (UNets ``conv_out``, DiT ``proj_out_2``, SD3/Flux/PixArt/Sana ``proj_out``)."""
        layer = _submodule(self.model, self.family.output_layer)
        if layer is None:
            raise ValueError(f"{type(self.model).__name__} has no {self.family.output_layer}")
        return layer

    # ----------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, timestep: Tensor, cond: Cond | None = None, *, extra_input: Tensor | None = None,
                **scalars: Tensor) -> Tensor:
        """x: (B, C, H, W) network input; timestep: (B,) float model time; cond: labels for class
        models, embeddings (B, L, D) for text models, the condition image (B, image_channels, H, W) for a backbone
        with image channels (required); extra_input: (B, extra_channels - image_channels, H, W) for a
        backbone with other extra input channels (zeros when omitted); scalars: (B,) floats named in
        ``extra_scalars`` (a declared scalar left out counts as its ``scalar_defaults`` value, else 0). Returns (B, out_channels, H, W) in
        the model's dtype (at least float32 for a student with a capped input level, :meth:`cap_input_level`).

        ``x`` and text embeddings are cast to the model's parameter dtype (a bf16 teacher fed by
        float32 sigma-space maths); timesteps and scalars stay float, as diffusers embeds them in float32.
        """
        unknown = [k for k in scalars if k not in self.extra_scalars]
        if unknown:
            raise ValueError(
                f"unknown scalar input(s) {unknown}; this backbone takes {list(self.extra_scalars) or 'none'} "
                "(add new ones with Backbone.add_scalar_inputs)"
            )
        batch = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        # A fresh view per call: its identity keys this call's extra embedding (see __init__).
        timestep = timestep.reshape(-1).expand(batch)
        cap, asked, x_in = self.input_cap, timestep, x
        if cap is not None:
            timestep = cap.timesteps(asked.float())
        if self.family.timestep_scale != 1.0:
            timestep = timestep * self.family.timestep_scale
        x = self._with_extra_input(x.to(self.model_dtype), extra_input, cond)
        height, width = x.shape[-2:]
        kwargs = self._model_kwargs(cond, x.dtype, batch, height, width, x.device)
        if self._pack > 1:
            x = pack_latents(x, self._pack)
        if self.native_guidance:
            w = scalars.get("w")
            scale = torch.zeros(batch, device=x.device) if w is None else torch.as_tensor(w, device=x.device)
            scale = scale.float().reshape(-1).expand(batch) / GUIDANCE_EMBED_SCALE
            # the pipelines' convention: timestep_cond embeds guidance_scale - 1
            kwargs["timestep_cond"] = guidance_scale_embedding(
                scale - 1.0, self.model.config.time_cond_proj_dim).to(self.model_dtype)
        extra = self._embed_scalars(scalars, batch, x.device)
        if extra is not None and self.kind == "dit":
            self._extra_by_timestep[timestep] = extra
        self._current_extra = extra
        try:
            out = self.model(x, timestep=timestep, return_dict=False, **kwargs)[0]
        finally:
            self._current_extra = None
        if self._pack > 1:
            out = unpack_latents(out, self._pack, height, width)
        if self._model_out_channels != self.out_channels:
            out = out[:, : self.out_channels]
        if cap is not None:
            out = cap.convert(out, x_in, asked.float(), timestep)
        return out

    def _needs(self, cond: Cond | None, *fields: str) -> Cond:
        missing = [f for f in fields if cond is None or getattr(cond, f) is None]
        if missing:
            raise ValueError(
                f"this {type(self.model).__name__} ({self.family.name} family) needs Cond fields {missing}: encode "
                "prompts with Teacher.encode_prompts / Teacher.null_cond, which fill them for this family"
            )
        assert cond is not None
        return cond

    def _model_kwargs(self, cond: Cond | None, dtype: torch.dtype, batch: int, height: int, width: int,
                      device: torch.device) -> dict[str, Any]:
        """The diffusers model's keyword inputs for this family (see fewstep.families for what each reads)."""
        labels = cond.labels if cond is not None else None
        kwargs: dict[str, Any] = {}
        if self.conditioning == "text":
            kwargs["encoder_hidden_states"] = self._needs(cond, "embeddings").embeddings.to(dtype)
        if self.kind == "unet2d_condition" and self.model.config.addition_embed_type == "text_time":
            c = self._needs(cond, "pooled", "added")
            kwargs["added_cond_kwargs"] = {"text_embeds": c.pooled.to(dtype), "time_ids": c.added.to(dtype)}
        elif self.kind == "sd3":
            kwargs["pooled_projections"] = self._needs(cond, "pooled").pooled.to(dtype)
        elif self.kind == "flux":
            c = self._needs(cond, "pooled")
            kwargs["pooled_projections"] = c.pooled.to(dtype)
            kwargs["txt_ids"] = torch.zeros(c.embeddings.shape[1], 3, device=device, dtype=dtype)
            kwargs["img_ids"] = flux_image_ids(height // self._pack, width // self._pack, device, dtype)
            if self.embedded_guidance is not None:
                g = c.guidance if c.guidance is not None else torch.full((batch,), self.embedded_guidance)
                kwargs["guidance"] = g.to(device, torch.float32).reshape(-1).expand(batch)
        elif self.kind in ("pixart", "sana"):
            if cond is not None and cond.attention_mask is not None:
                kwargs["encoder_attention_mask"] = cond.attention_mask
            if self.kind == "pixart":
                added = None
                if self.model.use_additional_conditions:
                    added = self._needs(cond, "added").added.to(dtype)
                kwargs["added_cond_kwargs"] = {
                    "resolution": None if added is None else added[:, :2],
                    "aspect_ratio": None if added is None else added[:, 2:3],
                }
        if self._label_rows is not None:
            if labels is None:
                raise ValueError(
                    f"this {type(self.model).__name__} is class-conditional: pass Cond(labels=(B,) int64) "
                    f"with classes in [0, {self.num_classes}) or the null label {self.num_classes}"
                )
            kwargs["class_labels"] = labels
        return kwargs

    def _with_extra_input(self, x: Tensor, extra_input: Tensor | None, cond: Cond | None) -> Tensor:
        """[x, Cond.image, extra_input] along channels (module docstring: extra input channels, condition image)."""
        image = cond.image if cond is not None else None
        parts = [x]
        if self.image_channels:
            if image is None:
                raise ValueError(
                    f"this backbone is image-conditioned: it reads a ({x.shape[0]}, {self.image_channels}, "
                    f"{x.shape[2]}, {x.shape[3]}) condition image from Cond.image, and the Cond has none. Training: "
                    "the teacher's image_condition (fewstep_teacher.json) makes it from the data; sampling: pass "
                    "Cond(image=...) (e.g. a LowDiff stage's up-sampled previous output, via the lowdiff cascade)")
            if image.shape[0] != x.shape[0] or image.shape[1] != self.image_channels or image.shape[2:] != x.shape[2:]:
                raise ValueError(f"Cond.image has shape {tuple(image.shape)}; this backbone expects "
                                 f"({x.shape[0]}, {self.image_channels}, {x.shape[2]}, {x.shape[3]})")
            parts.append(image.to(x.dtype))
        elif image is not None:
            raise ValueError(f"Cond.image given (shape {tuple(image.shape)}), but this {type(self.model).__name__} "
                             "reads no condition image (image_channels = 0); drop it, or use an image-conditioned "
                             "teacher (Backbone.add_image_channels)")
        other = self.extra_channels - self.image_channels
        if not other:
            if extra_input is not None:
                raise ValueError("extra_input given, but this backbone has no extra input channels besides its "
                                 "condition image (add them with Backbone.add_input_channels)")
        else:
            if extra_input is None:
                extra_input = x.new_zeros(x.shape[0], other, *x.shape[2:])
            if extra_input.shape[1] != other or extra_input.shape[2:] != x.shape[2:]:
                raise ValueError(f"extra_input has shape {tuple(extra_input.shape)}; this backbone expects "
                                 f"(B, {other}, {x.shape[2]}, {x.shape[3]})")
            parts.append(extra_input.to(x.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    # ------------------------------------------------------------------------ extra input channels

    def add_input_channels(self, n: int) -> None:
        """Widen the first convolution by ``n`` zero-initialised input channels (see the module docstring).

        The diffusers config's ``in_channels`` grows by ``n`` (``out_channels`` is pinned to the data
        channels), so ``save_pretrained`` / ``from_pretrained`` round-trip the widened model.
        """
        self._widen_input(n, self.in_channels + self.extra_channels)
        self.extra_channels += n

    def add_image_channels(self, n: int) -> None:
        """Read a condition image of ``n`` channels from ``Cond.image`` (module docstring): ``n`` zero-initialised
        input channels inserted after x and any image channels already there, before the other extra channels."""
        self._widen_input(n, self.in_channels + self.image_channels)
        self.extra_channels += n
        self.image_channels += n

    def set_image_channels(self, n: int) -> None:
        """Read the first ``n`` extra input channels from ``Cond.image`` and the rest from ``extra_input``; the
        weights do not change. A LowDiff model saved before ``Cond.image`` existed read its condition through
        ``extra_input``: ``set_image_channels(extra_channels)`` reads the same channels from Cond.image."""
        if not 0 <= n <= self.extra_channels:
            raise ValueError(f"set_image_channels({n}): this backbone has {self.extra_channels} extra input channels")
        if self.self_conditioning and self.extra_channels - n != self.in_channels:
            raise ValueError(f"set_image_channels({n}): the self-conditioning channels must stay extra_input")
        self.image_channels = n

    def set_scalar_default(self, name: str, value: float) -> None:
        """The value the declared scalar ``name`` takes when a call leaves it out (module docstring)."""
        if name not in self.scalar_embeddings:
            raise ValueError(f"set_scalar_default: {name!r} is not an embedded scalar input of this backbone "
                             f"(it has {list(self.scalar_embeddings) or 'none'})")
        self.scalar_defaults[name] = float(value)

    def _widen_input(self, n: int, at: int) -> None:
        """Insert ``n`` zero-initialised input channels at data-channel position ``at`` of the input layer."""
        if n < 1:
            raise ValueError(f"extra input channels: n must be >= 1, got {n}")
        parent_path, _, attr = self.family.input_layer.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = getattr(parent, attr)
        grow = n * self._pack**2  # Flux: each latent channel is 4 token features (channel-major packing)
        at *= self._pack**2
        if isinstance(layer, nn.Linear):
            old_in = layer.in_features
            wider: nn.Module = nn.Linear(old_in + grow, layer.out_features, bias=layer.bias is not None)
        else:
            old_in = layer.in_channels
            wider = nn.Conv2d(old_in + grow, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              bias=layer.bias is not None)
        wider = wider.to(layer.weight.device, layer.weight.dtype)
        with torch.no_grad():
            wider.weight.zero_()
            wider.weight[:, :at] = layer.weight[:, :at]
            wider.weight[:, at + grow :] = layer.weight[:, at:]
            if layer.bias is not None:
                wider.bias.copy_(layer.bias)
        setattr(parent, attr, wider)
        self.model.register_to_config(in_channels=old_in + grow, out_channels=self._model_out_channels * self._pack**2)

    def enable_self_conditioning(self) -> None:
        """Self-conditioning (Analog Bits, distribution.md §6): the network also reads its own previous x0
        estimate, as ``in_channels`` zero-initialised extra input channels (so it starts as it was)."""
        if self.self_conditioning:
            return
        if self.extra_channels - self.image_channels:
            raise ValueError("enable_self_conditioning: this backbone already has other extra input channels")
        self.add_input_channels(self.in_channels)
        self.self_conditioning = True

    # ------------------------------------------------------------------------------- bottleneck

    def bottleneck(self, x: Tensor, timestep: Tensor, cond: Cond | None = None, *,
                   extra_input: Tensor | None = None, **scalars: Tensor) -> Tensor:
        """Encoder features for the same inputs as :meth:`forward`: (B, D, h, w).

        UNets: the mid block's output; DiT: the last transformer block's tokens as a (B, D, H/p, W/p)
        map. The decoder is not run (a forward hook stops the model there); gradients flow to x and
        to the encoder's parameters as usual.
        """
        target = _submodule(self.model, self.family.bottleneck)
        if target is None:
            raise ValueError(f"{type(self.model).__name__} has no {self.family.bottleneck} (e.g. mid_block_type=None), "
                             "so it has no bottleneck features; use a backbone with one")
        return self._capture([target], x, timestep, cond, extra_input=extra_input, **scalars)[0]

    def feature_modules(self) -> list[nn.Module]:
        """The modules of :meth:`features`, in the order the forward pass runs them (``Family.feature_levels``;
        a path naming a module list stands for each of its blocks; absent paths are skipped)."""
        modules: list[nn.Module] = []
        for path in self.family.feature_levels:
            module = _submodule(self.model, path)
            modules += list(module) if isinstance(module, nn.ModuleList) else [] if module is None else [module]
        if not modules:
            raise ValueError(f"{type(self.model).__name__} has none of the feature levels "
                             f"{self.family.feature_levels} of family {self.family.name}")
        return modules

    def features(self, x: Tensor, timestep: Tensor, cond: Cond | None = None, *,
                 extra_input: Tensor | None = None, **scalars: Tensor) -> list[Tensor]:
        """Feature maps of every level (:meth:`feature_modules`) for the same inputs as :meth:`forward`, each
        (B, D_i, h_i, w_i): UNets the mid block and every up block, transformers every block's image tokens as
        maps. The model stops after the last level; gradients flow to x and the parameters as usual."""
        return self._capture(self.feature_modules(), x, timestep, cond, extra_input=extra_input, **scalars)

    def _capture(self, targets: list[nn.Module], x: Tensor, timestep: Tensor, cond: Cond | None, *,
                 extra_input: Tensor | None, **scalars: Tensor) -> list[Tensor]:
        """Outputs of ``targets`` (run in this order) as (B, D, h, w) maps; the pass stops after the last."""
        captured: list[Tensor] = []

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            # Joint-attention blocks (SD3, Flux) return (text tokens, image tokens).
            captured.append(output[-1] if isinstance(output, tuple) else output)
            if len(captured) == len(targets):
                raise _Bottleneck

        handles = [target.register_forward_hook(keep) for target in targets]
        try:
            self(x, timestep, cond, extra_input=extra_input, **scalars)
        except _Bottleneck:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != len(targets):
            raise RuntimeError(f"{len(targets)} feature modules of {type(self.model).__name__}, but the forward pass "
                               f"ran {len(captured)} of them; a module in family {self.family.name}'s feature "
                               "paths is not called by its forward")
        p = self._pack * int(self.model.config.get("patch_size") or 1)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        # transformer tokens (B, N, D) -> (B, D, H/p, W/p)
        return [f.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w) if f.ndim == 3 else f for f in captured]

    # ------------------------------------------------------------------------ extra scalar inputs

    @property
    def native_guidance(self) -> bool:
        """Whether ``w`` is read by the diffusers model's own ``time_embedding.cond_proj`` (module docstring)."""
        return "w" in self.extra_scalars and "w" not in self.scalar_embeddings

    def add_scalar_inputs(self, names: Sequence[str], *, native_guidance: bool = True) -> None:
        """Add a zero-initialised embedding for each new scalar name (already present: skipped).

        A ``UNet2DConditionModel`` takes ``w`` natively when ``native_guidance``: a zero-initialised
        ``time_embedding.cond_proj`` (kept when the model already has one) and ``time_cond_proj_dim`` in its
        config (module docstring). Every other scalar, and ``w`` elsewhere, gets a :class:`ScalarEmbedding`.

        The embeddings' output is added to the time embedding: the output of ``model.time_embedding``
        for UNets, the timestep MLP inside the time/conditioning embedding of SD3, Flux, PixArt and Sana
        (``fewstep.families.Family.time_embedding``; the sum then conditions every block and the output
        norm), and for DiT the output of every block's ``norm1.emb`` (timestep + label embedder,
        which also conditions the final ``proj_out`` through block 0's embedder). All DiT blocks
        share one extra embedding, as the original DiT shares one timestep embedder.
        """
        new = [n for n in dict.fromkeys(names) if n not in self.extra_scalars]
        if not new:
            return
        for n in new:
            if not n.isidentifier():
                raise ValueError(
                    f"scalar input name {n!r} must be a Python identifier (it is a keyword argument)"
                )
        ref = next(self.model.parameters())
        native = "w" in new and native_guidance and self.kind == "unet2d_condition"
        if native:
            self._add_guidance_projection()
        embedded = [n for n in new if not (native and n == "w")]
        if embedded:
            proj, width = self._time_features()
        for n in embedded:
            self.scalar_embeddings[n] = ScalarEmbedding(proj, width).to(ref.device, ref.dtype)
        self.extra_scalars = (*self.extra_scalars, *new)
        if embedded and not self._hooked:
            if self.kind == "dit":
                for block in self.model.transformer_blocks:
                    block.norm1.emb.register_forward_hook(self._add_extra_dit)
            else:
                self._time_modules()[1].register_forward_hook(self._add_extra)
            self._hooked = True

    def _add_guidance_projection(self) -> None:
        te = self.model.time_embedding
        if te.cond_proj is None:
            ref = te.linear_1.weight
            te.cond_proj = nn.Linear(GUIDANCE_COND_DIM, te.linear_1.in_features, bias=False).to(ref.device, ref.dtype)
            nn.init.zeros_(te.cond_proj.weight)
            self.model.register_to_config(time_cond_proj_dim=GUIDANCE_COND_DIM)

    def embed_guidance_as_scalar(self) -> None:
        """Move a native, still untrained guidance input ``w`` to a :class:`ScalarEmbedding` and drop
        ``time_embedding.cond_proj`` again (a LoRA student: its frozen base is the teacher's model, which has none)."""
        if not self.native_guidance:
            return
        te = self.model.time_embedding
        if te.cond_proj.weight.detach().abs().max() != 0:
            raise ValueError("embed_guidance_as_scalar: the native guidance projection is already trained; "
                             "only a freshly built student can move its w input")
        te.cond_proj = None
        self.model.register_to_config(time_cond_proj_dim=None)
        self.extra_scalars = tuple(n for n in self.extra_scalars if n != "w")
        self.add_scalar_inputs(["w"], native_guidance=False)

    def _time_modules(self) -> tuple[nn.Module, nn.Module]:
        """(sinusoidal timestep features, time-embedding MLP) of a non-DiT backbone: the first pair of the
        family's ``time_embedding`` paths present in this model."""
        for proj_path, emb_path in self.family.time_embedding:
            proj, emb = _submodule(self.model, proj_path), _submodule(self.model, emb_path)
            if proj is not None and emb is not None:
                return proj, emb
        raise ValueError(f"{type(self.model).__name__}: none of the time embeddings {self.family.time_embedding} of "
                         f"the {self.family.name} family exists in this model, so it cannot take extra scalar inputs")

    def _time_features(self) -> tuple[Timesteps, int]:
        """The backbone's own sinusoidal timestep features and the time-embedding width."""
        if self.kind == "dit":
            emb = self.model.transformer_blocks[0].norm1.emb
            return emb.time_proj, emb.timestep_embedder.linear_2.out_features
        proj, te = self._time_modules()
        # Fourier / learned time features: use plain sinusoids of the same width.
        if not isinstance(proj, Timesteps):
            proj = Timesteps(te.linear_1.in_features, True, 0)
        return proj, te.linear_2.out_features

    def _embed_scalars(self, scalars: dict[str, Tensor], batch: int, device: torch.device) -> Tensor | None:
        if not len(self.scalar_embeddings):
            return None
        total = None
        for name in self.scalar_embeddings:
            value = scalars.get(name)
            value = (
                torch.full((batch,), self.scalar_defaults.get(name, 0.0), device=device) if value is None
                else torch.as_tensor(value, device=device)
            )
            emb = self.scalar_embeddings[name](value.reshape(-1).expand(batch))
            total = emb if total is None else total + emb
        return total

    # Hooks are bound methods, so copy.deepcopy(backbone) gives the copy hooks bound to the copy.
    def _add_extra(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        extra = self._current_extra
        return output if extra is None else output + extra.to(output.dtype)

    def _add_extra_dit(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        extra = self._extra_by_timestep.get(args[0]) if args else None
        if extra is None:
            extra = self._current_extra
        return output if extra is None else output + extra.to(output.dtype)

    def cap_input_level(self, process: Any, sigma: float | None) -> None:
        """Evaluate the network at no higher level than ``sigma`` (None: remove the cap); see the module docstring
        and docs/CONDITIONING.md. For a VP ``process``, the teacher's: for timestep t above the cap's t_c the
        network gets the same input x_t and timestep t_c, and its output o is returned as the output at t that
        means the same x0, out_t(x0_tc(o)); callers (``NoiseProcess.denoise``) then read x0 = x0_tc(o). Below
        the cap nothing changes, so a copy of the teacher still equals it there."""
        self.input_cap = None if sigma is None else InputCap(process, sigma)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the diffusers model's blocks in backward (diffusers' own checkpointing)."""
        self.model.enable_gradient_checkpointing()

    # ---------------------------------------------------------------------------- serialisation

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description sufficient to rebuild this backbone (weights not included)."""
        model_config = {k: v for k, v in self.model.config.items() if not k.startswith("_")}
        return {
            "kind": self.kind,
            "model_class": type(self.model).__name__,
            "model_config": json.loads(json.dumps(model_config)),
            "extra_scalars": list(self.extra_scalars),
            "num_classes": self.num_classes,
            "extra_channels": self.extra_channels,
            "image_channels": self.image_channels,
            "scalar_defaults": dict(self.scalar_defaults),
            "self_conditioning": self.self_conditioning,
            "sample_size": self.sample_size,
            "family": self.family.name,
            "input_cap": None if self.input_cap is None else self.input_cap.config(),
        }

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> Backbone:
        """Rebuild with random weights (load them afterwards with ``load_state_dict``)."""
        name = cfg["model_class"]
        if name not in SUPPORTED_MODELS:
            raise _unsupported(name)
        model = SUPPORTED_MODELS[name][1].from_config(cfg["model_config"])
        backbone = cls(model, cfg.get("extra_scalars", ()), num_classes=cfg.get("num_classes"),
                       extra_channels=cfg.get("extra_channels", 0),
                       self_conditioning=cfg.get("self_conditioning", False), sample_size=cfg.get("sample_size"),
                       family=cfg.get("family"), image_channels=cfg.get("image_channels", 0),
                       scalar_defaults=cfg.get("scalar_defaults"))
        if cfg.get("input_cap") is not None:
            backbone.input_cap = InputCap.from_config(cfg["input_cap"])
        return backbone

    def save_pretrained(self, folder: str | Path) -> None:
        """diffusers model folder (config.json + safetensors) plus fewstep's metadata and extra weights."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        meta = {"kind": self.kind, "extra_scalars": list(self.extra_scalars), "num_classes": self.num_classes,
                "extra_channels": self.extra_channels, "self_conditioning": self.self_conditioning,
                "sample_size": self.sample_size, "family": self.family.name}
        if self.image_channels:
            meta["image_channels"] = self.image_channels
        if self.scalar_defaults:
            meta["scalar_defaults"] = dict(self.scalar_defaults)
        if self.input_cap is not None:
            meta["input_cap"] = self.input_cap.config()
        (folder / BACKBONE_META).write_text(json.dumps(meta, indent=2) + "\n")
        extra_file = folder / EXTRA_WEIGHTS
        if len(self.scalar_embeddings):
            state = {k: v.detach().contiguous().cpu() for k, v in self.scalar_embeddings.state_dict().items()}
            save_file(state, extra_file)
        elif extra_file.exists():
            extra_file.unlink()

    @classmethod
    def from_pretrained(cls, folder: str | Path, num_classes: int | None = None, *, sample_size: int | None = None,
                        family: str | None = None) -> Backbone:
        """Load a folder written by :meth:`save_pretrained`, or a plain diffusers model folder.

        num_classes: overrides the value in fewstep's metadata (see the class docstring). sample_size /
        family: the latent size and family (fewstep.families) when the config alone does not say them."""
        folder = Path(folder).expanduser().resolve()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no diffusers model at {folder}: {config_file.name} is missing (expected a folder written "
                "by save_pretrained of a diffusers model)"
            )
        name = json.loads(config_file.read_text()).get("_class_name")
        if name not in SUPPORTED_MODELS:
            raise _unsupported(str(name))
        model = SUPPORTED_MODELS[name][1].from_pretrained(folder, local_files_only=True)
        return cls.wrap(model, folder, num_classes, sample_size=sample_size, family=family)

    @classmethod
    def wrap(cls, model: nn.Module, folder: str | Path, num_classes: int | None = None, *,
             sample_size: int | None = None, family: str | None = None) -> Backbone:
        """Wrap a diffusers model already loaded from ``folder`` (e.g. by a diffusers pipeline), with the
        fewstep metadata and extra scalar embeddings :meth:`save_pretrained` wrote there."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file = folder / BACKBONE_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if num_classes is None:
            num_classes = meta.get("num_classes")
        backbone = cls(model, meta.get("extra_scalars", ()), num_classes=num_classes,
                       extra_channels=meta.get("extra_channels", 0),
                       self_conditioning=meta.get("self_conditioning", False),
                       sample_size=sample_size if sample_size is not None else meta.get("sample_size"),
                       family=family if family is not None else meta.get("family"),
                       image_channels=meta.get("image_channels", 0), scalar_defaults=meta.get("scalar_defaults"))
        if meta.get("input_cap") is not None:
            backbone.input_cap = InputCap.from_config(meta["input_cap"])
        if len(backbone.scalar_embeddings):
            extra_file = folder / EXTRA_WEIGHTS
            if not extra_file.is_file():
                raise FileNotFoundError(
                    f"{meta_file} declares extra scalars {list(backbone.extra_scalars)} but {extra_file} is missing"
                )
            backbone.scalar_embeddings.load_state_dict(load_file(extra_file))
        return backbone


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """``model.a.b.-1`` by dotted path (negative integers index module lists); None when absent."""
    module: Any = model
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            if not isinstance(module, nn.ModuleList) or not len(module):
                return None
            module = module[int(part)]
        else:
            module = getattr(module, part, None)
        if module is None:
            return None
    return module


def pack_latents(x: Tensor, p: int = 2) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C * p * p) tokens of p x p patches, channel-major, as
    FluxPipeline._pack_latents (row-major over patches)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: Tensor, p: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: (B, H/p * W/p, C * p * p) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Flux's positional ids of an h x w token grid: (h * w, 3) rows (0, row, column), as
    FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3).to(dtype)


def guidance_inputs(w: Tensor | None) -> dict[str, Tensor]:
    """The scalar inputs of a guidance-conditioned student for scales w (B,): ``{"w": w * 100}``, or
    none when w is None (an unguided student)."""
    return {} if w is None else {"w": w * GUIDANCE_EMBED_SCALE}


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """(B,) -> (B, dim) float32 sinusoidal features of ``w * 1000`` (VDM's embedding, as diffusers'
    ``StableDiffusionPipeline.get_guidance_scale_embedding`` computes ``timestep_cond``, checked against
    diffusers 0.42.1): sin then cos at frequencies 10000^(-i / (dim/2 - 1)), zero-padded to an odd ``dim``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float().reshape(-1) * 1000.0)[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def enable_gradient_checkpointing(network: nn.Module) -> None:
    """Recompute the diffusers blocks of every Backbone in ``network`` in backward (the extra scalar hooks
    stay correct). Networks without a backbone (GAN heads, sCM's adaptive weight) are skipped by design:
    they are a few small layers whose activations are not worth recomputing."""
    for module in network.modules():
        if isinstance(module, Backbone):
            module.enable_gradient_checkpointing()
