"""Load, freeze and query a local diffusers teacher.

A teacher is a :class:`~fewstep.backbones.Backbone`, the :class:`~fewstep.diffusion.NoiseProcess`
read from its scheduler config, and, where the checkpoint has them, a VAE (latent teachers) and a
text encoder with its tokenizer (text-conditional teachers). Everything downstream talks to it in
sigma space (``x = x0 + sigma * eps``) through :meth:`Teacher.denoise`, whatever the teacher's own
process and parameterisation.

Folder layouts read by :func:`load_teacher` (never any network access):

(a) a pipeline folder with ``model_index.json``: the backbone in ``unet/`` or ``transformer/``, the
    scheduler in ``scheduler/scheduler_config.json``, ``vae/`` and the text encoders / tokenizers its family
    needs (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``...; see :mod:`fewstep.families`): a stock
    SD, SDXL, SD3, Flux, PixArt, Sana or DiT pipeline folder as ``save_pretrained`` writes it;
(b) a model folder with ``config.json`` and a scheduler config in the same folder
    (``scheduler_config.json``) or in a ``scheduler/`` folder inside it or beside it.

An optional ``fewstep_teacher.json`` at the top holds ``{"num_classes": int}``: how many real classes a
class-conditional UNet2DModel has (its label table has one more row, the null class); ``"sample_size"``:
the latent size where the configs do not say it (Flux); ``"max_sequence_length"``: the T5/Gemma text
length instead of the stock pipeline's default; ``"image_condition"``: how an image-conditioned teacher's condition
image is made from its data (:class:`fewstep.imagecond.ImageCondition`, e.g. a LowDiff stage teacher).

:func:`save_teacher` writes layout (a). An unconditional pixel UNet with a VP process is saved as a
stock ``DDPMPipeline`` (``diffusers.DiffusionPipeline.from_pretrained`` loads it); every other teacher
gets ``"_class_name": "FewStepTeacher"`` in ``model_index.json``, a marker only fewstep's loader reads
(there is no pipeline class of that name; the components are still ordinary diffusers/transformers folders).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep import selfcond
from fewstep.backbones import Backbone
from fewstep.diffusion import NoiseProcess, X0Clip, cfg, process_from_scheduler_config, sample_ode
from fewstep.families import Family, PromptEncoder, detect_family
from fewstep.imagecond import ImageCondition
from fewstep.types import Cond

__all__ = ["FEWSTEP_PIPELINE", "Teacher", "load_teacher", "save_teacher"]

FEWSTEP_PIPELINE = "FewStepTeacher"
TEACHER_META = "fewstep_teacher.json"


class Teacher:
    """Frozen teacher: eval mode, ``requires_grad`` False, in the compute dtype (the VAE stays in
    float32 when its config sets ``force_upcast``, as in diffusers pipelines).

    net: the backbone; process: its noise process. vae: diffusers AutoencoderKL or None (pixel teacher).
    vae_scale / vae_shift: latent = (vae mean - shift) * scale (1.0 / 0.0 for pixel teachers); the VAE's
        ``scaling_factor`` and ``shift_factor`` (SD3, Flux).
    text_encoder / tokenizer: the first text encoder and its tokenizer, or None; prompt_encoder: the
        family's :class:`~fewstep.families.PromptEncoder` over all of its encoders (built from
        text_encoder / tokenizer as SD's CLIP when not given). family: the teacher family
        (:mod:`fewstep.families`), as the backbone reports it. components: every loaded pipeline
        component by name (denoiser model, vae, encoders, tokenizers), e.g. for an export.
    conditioning: "none" | "class" | "text"; num_classes: real classes (null label = num_classes).
    sample_shape: (C, H, W) in model space (latents for a latent teacher); data_shape: (C, H, W) of images.
    weak: a weaker checkpoint of the same model (same process and parameterisation) for autoguidance
        (Karras et al. 2024), or None; when present every guided prediction uses it as the reference
        instead of the unconditional prediction (see :meth:`denoise`).
    image_condition: for a teacher whose backbone reads a condition image (``net.image_channels``), how the
        trainer makes that image from the data (:mod:`fewstep.imagecond`); None: the caller gives ``Cond.image``.
    """

    def __init__(
        self,
        net: Backbone,
        process: NoiseProcess,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        source: Path | None = None,
        weak: Backbone | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prompt_encoder: PromptEncoder | None = None,
        components: dict[str, Any] | None = None,
        image_condition: ImageCondition | None = None,
    ) -> None:
        if image_condition is not None and not net.image_channels:
            raise ValueError(f"teacher at {source}: an image_condition is given, but its backbone reads no condition "
                             "image (image_channels = 0); remove image_condition from fewstep_teacher.json")
        self.image_condition = image_condition
        self.net = net
        self.process = process
        self.weak = weak
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.family: Family = net.family
        self.source = Path(source) if source is not None else Path(".")
        self.conditioning: str = net.conditioning
        self.num_classes: int | None = net.num_classes if net.conditioning == "class" else None
        if self.conditioning == "text" and prompt_encoder is None and (text_encoder is None or tokenizer is None):
            raise ValueError(
                f"teacher at {self.source} is text-conditional ({self.family.description}) but has no text "
                "encoder/tokenizer; add text_encoder/ and tokenizer/ folders next to the backbone"
            )
        self.sample_shape: tuple[int, int, int] = (net.in_channels, net.sample_size, net.sample_size)
        factor = 1
        if vae is not None:
            blocks = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
            factor = 2 ** (len(blocks) - 1)
            size = net.sample_size * factor
            self.data_shape: tuple[int, int, int] = (int(vae.config.in_channels), size, size)
            self.vae_scale = float(vae.config.scaling_factor)
            self.vae_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        else:
            self.data_shape = self.sample_shape
            self.vae_scale, self.vae_shift = 1.0, 0.0
        self.components: dict[str, Any] = dict(components or {})
        if prompt_encoder is None and text_encoder is not None and tokenizer is not None:
            size = (net.sample_size * factor,) * 2
            prompt_encoder = PromptEncoder(self.family, {"text_encoder": text_encoder, "tokenizer": tokenizer}, size)
        self.prompt_encoder = prompt_encoder
        self._null_text: Cond | None = None
        for module in self._modules():
            module.eval().requires_grad_(False)
        self.dtype = dtype
        self.device = torch.device(device)
        self.to(device, dtype)

    def _modules(self) -> list[nn.Module]:
        encoders = self.prompt_encoder.encoders if self.prompt_encoder is not None else [self.text_encoder]
        unique = {id(m): m for m in (self.net, self.weak, self.vae, self.text_encoder, *encoders) if m is not None}
        return list(unique.values())

    @property
    def autoguided(self) -> bool:
        """Whether guidance uses the weaker checkpoint (autoguidance) rather than the null condition (CFG)."""
        return self.weak is not None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Teacher:
        """Move every network (and change the compute dtype when ``dtype`` is given); returns self."""
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in self._modules():
            module.to(self.device, self._vae_dtype if module is self.vae else self.dtype)
        self._null_text = None
        return self

    @property
    def _vae_dtype(self) -> torch.dtype:
        # diffusers pipelines run a VAE whose config says force_upcast (e.g. SD/SDXL) in float32.
        upcast = self.vae is not None and getattr(self.vae.config, "force_upcast", False)
        return torch.float32 if upcast else self.dtype

    # ------------------------------------------------------------------------------ prediction

    @torch.no_grad()
    def denoise(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cond: Cond | None = None,
        *,
        uncond: Cond | None = None,
        guidance: float | Tensor = 1.0,
        estimate: Tensor | None = None,
        clip: bool = True,
    ) -> Tensor:
        """Sigma-space x0 prediction D(x, sigma) for x = x0 + sigma*eps: (B, C, H, W), sigma (B,).

        A teacher whose scheduler bounds x0 (``clip_sample`` / ``thresholding``, ``process.x0_clip``) returns the
        bounded x0, as its own scheduler reads the network, so every method's target built from this x0 (an ODE
        step, a score, a regression target) honours it; an ODE step with the bounded x0 is diffusers' DDIM step
        with ``use_clipped_model_output=True``. ``clip=False``: the unbounded prediction (:meth:`sample` needs
        both for the stock DDIM step).

        A self-conditioned teacher (Analog Bits) is queried as a deterministic function with two passes,
        D(x | sg D(x | 0)) (distribution.md §6.4), or with one pass on a given ``estimate`` of x0 (its
        sampler's running estimate); ``estimate`` is refused for other teachers.

        Runs in the teacher's dtype, returns x's dtype. With ``guidance != 1`` (a float or (B,)) the
        prediction is guided in x0 space, ref + g * (main - ref), from one batched pass:
        - classifier-free guidance (Ho & Salimans 2022): ref is the prediction for ``uncond`` (the null
          condition, filled in from :meth:`null_cond` when not given);
        - autoguidance (Karras et al. 2024, distribution.md §5.1), when the teacher has a ``weak``
          checkpoint: ref is the weak model's prediction for the same ``cond``; ``uncond`` is unused.
        At a fixed x, guidance in x0 space equals guidance on eps, v or velocity.

        A guidance-distilled teacher (Flux with ``guidance_embeds``, e.g. Flux-dev) takes the scale as an
        input instead: ``guidance`` (1.0 included) is fed to its guidance embedding in one pass, with no
        classifier-free combination (unless the teacher is autoguided).
        """
        guided = isinstance(guidance, Tensor) or guidance != 1.0
        xd = x.to(self.device, self.dtype)
        sigma = torch.as_tensor(sigma, device=self.device)
        if self.net.embedded_guidance is not None and self.weak is None:
            scale = torch.as_tensor(guidance, device=self.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            cond = dataclasses.replace(cond if cond is not None else Cond(), guidance=scale)
            guided = False
        if estimate is not None and not self.net.self_conditioning:
            raise ValueError(f"estimate given, but the teacher {self.source} is not self-conditioned")
        est = None if estimate is None else estimate.to(self.device, self.dtype)

        def predict(net: Backbone, x_: Tensor, sigma_: Tensor, cond_: Cond | None, est_: Tensor | None) -> Tensor:
            if not net.self_conditioning:
                return self.process.denoise(net, x_, sigma_, self._cast(cond_))
            if est_ is None:
                return selfcond.two_pass(self.process, net, x_, sigma_, self._cast(cond_), clip=self.vae is None)
            return selfcond.denoise(self.process, net, x_, sigma_, self._cast(cond_), estimate=est_)

        bound = self.process.x0_clip if clip else X0Clip()
        if not guided:
            return bound(predict(self.net, xd, sigma, cond, est)).to(x.dtype)
        if isinstance(guidance, Tensor):
            guidance = guidance.to(self.device)
        if self.weak is not None:
            main = predict(self.net, xd, sigma, cond, est)
            ref = predict(self.weak, xd, sigma, cond, est)
            return bound(cfg(main, ref, guidance)).to(x.dtype)
        if cond is None or self.conditioning == "none":
            raise ValueError(
                f"guidance={guidance} on the unconditional teacher {self.source}: classifier-free guidance needs a "
                "class- or text-conditional teacher; for an unconditional one give a weaker checkpoint as "
                "teacher.autoguidance, or set the guidance scale to 1.0"
            )
        if uncond is None:
            uncond = self.null_cond(x.shape[0])
        if cond.image is not None and uncond.image is None:  # the null condition keeps the image (Cond.where)
            uncond = uncond.with_image(cond.image)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        both = predict(self.net, torch.cat([xd, xd]), torch.cat([sigma, sigma]), Cond.cat([cond, uncond]),
                       None if est is None else torch.cat([est, est]))
        cond_x0, uncond_x0 = both.chunk(2)
        return bound(cfg(cond_x0, uncond_x0, guidance)).to(x.dtype)

    def _cast(self, cond: Cond | None) -> Cond | None:
        return None if cond is None else cond.to(self.device, self.dtype)

    # ---------------------------------------------------------------------------- conditioning

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Prompts -> Cond as the family's stock pipeline encodes them (see :mod:`fewstep.families`): SD's
        CLIP gives embeddings (B, L, D) (last hidden state) and pooled (B, D); SDXL, SD3, Flux, PixArt and
        Sana fill the fields their denoisers read."""
        if self.prompt_encoder is None:
            raise ValueError(
                f"teacher at {self.source} has no text encoder; it is {self.conditioning!r}-conditioned"
            )
        return self.prompt_encoder.encode(list(prompts), self.device, self.dtype)

    def null_cond(self, n: int, device: torch.device | str | None = None) -> Cond | None:
        """The unconditional Cond for ``n`` samples: null labels, the empty prompt, or None."""
        device = self.device if device is None else torch.device(device)
        if self.conditioning == "class":
            if not self.net.has_null_class:
                raise ValueError(
                    f"teacher at {self.source} has no null class (label {self.num_classes} has no embedding), "
                    f"so it cannot be guided; if it was trained with one, write {TEACHER_META} with "
                    '{"num_classes": <number of real classes>} at the top of the folder'
                )
            return Cond(labels=torch.full((n,), self.num_classes, dtype=torch.long, device=device))
        if self.conditioning == "text":
            if self._null_text is None:
                assert self.prompt_encoder is not None
                with torch.no_grad():
                    self._null_text = self.prompt_encoder.encode([""], self.device, self.dtype, negative=True)
            return self._null_text.repeat(n).to(device)
        return None

    # --------------------------------------------------------------------------- latent space

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], (B, *data_shape) -> model space (B, *sample_shape), in images' dtype."""
        if self.vae is None:
            return images
        out = self.vae.encode(images.to(self.device, self._vae_dtype))
        # AutoencoderKL: the posterior mean; AutoencoderDC (Sana): a deterministic latent.
        mean = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
        return ((mean - self.vae_shift) * self.vae_scale).to(images.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Model space -> images in [-1, 1] (roughly), in z's dtype. Not under no_grad: a loss may
        backpropagate through the frozen decoder into the student's latents."""
        if self.vae is None:
            return z
        out = self.vae.decode(z.to(self.device, self._vae_dtype) / self.vae_scale + self.vae_shift).sample
        return out.to(z.dtype)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        cond: Cond | None = None,
        *,
        num_steps: int = 32,
        solver: str = "heun",
        uncond: Cond | None = None,
        guidance: float | Tensor = 1.0,
        decode: bool = True,
    ) -> Tensor:
        """The teacher's multistep ODE sampler: unit noise (B, *sample_shape) -> images (B, *data_shape),
        or model-space samples (B, *sample_shape) with ``decode=False``.

        A teacher whose scheduler bounds x0 (``process.x0_clip``) is sampled as its stock scheduler does it: with
        solver "ddim" or "euler" (the same step in sigma space), each step is diffusers' ``DDIMScheduler.step``
        (eta 0, ``use_clipped_model_output`` off): x_next = clip(x0) + sigma_next * eps with eps the network's own
        (unclipped) noise prediction, from x_T = noise as diffusers starts, so on VP teachers the trailing grid of
        ``process.sampling_sigmas`` gives stock ``DDIMPipeline`` / ``DDIMScheduler(timestep_spacing="trailing")``
        output. Heun (no stock
        counterpart) and self-conditioned teachers step with the bounded x0 of :meth:`denoise`."""
        sigmas = self.process.sampling_sigmas(num_steps).to(noise.device)
        x = noise.float() * sigmas[0]

        def denoise_fn(x_: Tensor, sigma: Tensor, estimate: Tensor | None = None) -> Tensor:
            return self.denoise(x_, sigma, cond, uncond=uncond, guidance=guidance, estimate=estimate)

        bound = self.process.x0_clip
        if bound.active and solver in ("ddim", "euler") and not self.net.self_conditioning:
            sigmas = sigmas.to(x.device, x.dtype)
            # diffusers starts at x_T = z (init_noise_sigma 1), i.e. x = z / alpha_T = z * sqrt(1 + sigma_T^2) in
            # sigma space, not sigma_T * z: at alphabar ~ 4e-5 the 2e-5 difference shows ~150x in the first x0.
            if self.process.kind == "vp":
                x = noise.float() * (1 + sigmas[0] ** 2).sqrt()
            for i in range(sigmas.numel() - 1):
                s, s_next = sigmas[i], sigmas[i + 1]
                x0 = self.denoise(x, s, cond, uncond=uncond, guidance=guidance, clip=False)
                x = bound(x0) + s_next * (x - x0) / s  # DDIM Eq. 12 with x0 clipped, eps = (x - x0)/sigma not
            return self.decode(x) if decode else x
        if self.net.self_conditioning:  # Analog Bits sampler: one pass per call on the running estimate
            denoise_fn = selfcond.RunningEstimate(denoise_fn, clip=self.vae is None)
        out = sample_ode(denoise_fn, x, sigmas, solver)
        return self.decode(out) if decode else out


# ------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _component_class(index: dict[str, Any], name: str, library: str, default: str) -> Any:
    import importlib

    entry = index.get(name)
    lib, cls = (entry[0], entry[1]) if isinstance(entry, list) and len(entry) == 2 else (library, default)
    module = importlib.import_module(lib)
    if not hasattr(module, cls):
        raise ValueError(f"model_index.json names {name} class {lib}.{cls}, which does not exist")
    return getattr(module, cls)


def load_teacher(
    path: str | Path,
    *,
    weak: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Teacher:
    """Load a local diffusers teacher folder (layout (a) or (b), see the module docstring), frozen.

    The folder's family (:func:`fewstep.families.detect_family`, JSON only) is checked first, so an
    unsupported checkpoint (unknown denoiser, missing encoder, inpainting UNet, SDXL refiner) fails here
    with a message naming what was found and what is supported, before any weight is read. Then the
    denoiser, the VAE and the family's text encoders/tokenizers are loaded with the classes
    ``model_index.json`` names; other components (safety checker, image encoders) are not loaded.

    weak: a second teacher folder, a weaker checkpoint of the same model, for autoguidance. It must
    have the same noise process (scheduler config), conditioning and data shape; its VAE and text
    encoder, if any, are not used (the main teacher's are)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"teacher folder not found: {root} (from {str(path)!r}); teacher.pretrained must be a local "
            "diffusers folder (nothing is downloaded); create one with save_pretrained or fewstep.teacher.save_teacher"
        )
    info = detect_family(root)
    family = info.family
    meta_file = root / TEACHER_META
    teacher_meta = _read_json(meta_file) if meta_file.is_file() else {}
    num_classes = teacher_meta.get("num_classes")
    image_condition = teacher_meta.get("image_condition")
    if image_condition is not None:
        image_condition = ImageCondition.from_config(image_condition, f"{meta_file} image_condition")
    net = Backbone.from_pretrained(info.denoiser_dir, num_classes=num_classes, sample_size=info.sample_size,
                                   family=family.name)

    components: dict[str, Any] = {family.denoiser_component: net.model}
    index = info.index
    wanted = ["vae"] + [name for pair in (*family.text_components, *family.optional_text_components) for name in pair]
    if index and family.prompt_encoder == "pipeline":
        wanted.append("scheduler")
    for name in wanted:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] and (root / name).is_dir()):
            continue
        cls = _component_class(index, name, entry[0], entry[1])
        components[name] = cls.from_pretrained(root / name, local_files_only=True)
    vae = components.get("vae")
    factor = 1
    if vae is not None:
        blocks = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
        factor = 2 ** (len(blocks) - 1)
    prompt_encoder = None
    if family.prompt_encoder is not None and "text_encoder" in components and "tokenizer" in components:
        meta = _read_json(meta_file) if meta_file.is_file() else {}
        prompt_encoder = PromptEncoder(family, components, (net.sample_size * factor,) * 2, index=index,
                                       max_sequence_length=meta.get("max_sequence_length"))
    process = process_from_scheduler_config(info.scheduler_config)
    weak_net = None
    if weak is not None:
        other = load_teacher(weak)
        _check_compatible(other, net, process, root)
        weak_net = other.net
    return Teacher(
        net,
        process,
        vae=vae,
        text_encoder=components.get("text_encoder"),
        tokenizer=components.get("tokenizer"),
        source=root,
        weak=weak_net,
        device=device,
        dtype=dtype,
        prompt_encoder=prompt_encoder,
        components=components,
        image_condition=image_condition,
    )


def _check_compatible(weak: Teacher, net: Backbone, process: NoiseProcess, root: Path) -> None:
    """The weak model of autoguidance must make predictions of the same kind as the main teacher."""
    problems = []
    if weak.process.scheduler_config() != process.scheduler_config():
        problems.append(f"noise process {weak.process.describe()!r} vs {process.describe()!r}")
    if weak.net.conditioning != net.conditioning or weak.net.num_classes != net.num_classes:
        problems.append(f"conditioning {weak.net.conditioning}/{weak.net.num_classes} classes vs "
                        f"{net.conditioning}/{net.num_classes}")
    if (weak.net.in_channels, weak.net.sample_size) != (net.in_channels, net.sample_size):
        problems.append(f"sample shape {weak.net.in_channels}x{weak.net.sample_size} vs "
                        f"{net.in_channels}x{net.sample_size}")
    if problems:
        raise ValueError(f"teacher.autoguidance {weak.source} does not match the teacher {root}: "
                         + "; ".join(problems) + ". Use an earlier or smaller checkpoint of the same model "
                         "(e.g. `fewstep export RUN OUT --checkpoint N` of the teacher's own run)")


def save_teacher(
    folder: str | Path,
    net: Backbone,
    process: NoiseProcess,
    *,
    vae: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    tokenizer: Any | None = None,
    image_condition: ImageCondition | None = None,
) -> Path:
    """Write a teacher as a layout-(a) pipeline folder (see the module docstring); returns the folder.
    image_condition: how the data makes the condition image of an image-conditioned backbone (fewstep.imagecond)."""
    if (image_condition is None) != (not net.image_channels):
        raise ValueError(f"save_teacher: a backbone with {net.image_channels} condition-image channels needs an "
                         "image_condition (and only such a backbone takes one), or the trainer cannot make its "
                         "condition from the data")
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sub = net.family.denoiser_component
    net.save_pretrained(folder / sub)
    scheduler_cfg = {**process.scheduler_config()}
    scheduler_cfg.setdefault("_diffusers_version", diffusers.__version__)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_cfg, indent=2) + "\n")

    ddpm = (net.kind == "unet2d" and net.conditioning == "none" and vae is None and process.kind == "vp"
            and not net.extra_channels)  # DDPMPipeline feeds no extra input channels
    index: dict[str, Any] = {
        "_class_name": "DDPMPipeline" if ddpm else FEWSTEP_PIPELINE,
        "_diffusers_version": diffusers.__version__,
        sub: ["diffusers", type(net.model).__name__],
        "scheduler": ["diffusers", scheduler_cfg["_class_name"]],
    }
    for name, module in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if module is None:
            continue
        module.save_pretrained(folder / name)
        library = "diffusers" if name == "vae" else "transformers"
        index[name] = [library, type(module).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta: dict[str, Any] = {"num_classes": net.num_classes}
    if image_condition is not None:
        meta["image_condition"] = image_condition.config()
    (folder / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder
