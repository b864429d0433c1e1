"""Teacher families as data: which diffusers checkpoints fewstep distils, and how each one is wired.

One :class:`Family` row per kind of checkpoint (DESIGN.md §9). A row says which denoiser class it
has and in which pipeline component, which encoders must be present, how their outputs assemble into
:class:`fewstep.types.Cond`, how the noise process is read from the scheduler config, where the
extra-scalar seam (``Backbone.add_scalar_inputs``: CTM/flow-map ``s``, guidance ``w``, TrigFlow time)
attaches, and which stock diffusers pipeline class an export writes. :class:`fewstep.backbones.Backbone`
and :func:`fewstep.teacher.load_teacher` read these rows; method plugins never see the family.

:func:`detect_family` reads only a folder's JSON configs (no weights, no imports of model code
beyond the diffusers scheduler defaults), so ``fewstep validate`` can refuse an unsupported
checkpoint (unknown denoiser, missing encoder, inpainting UNet, SDXL refiner...) before anything is built.

How each family's prompts become a ``Cond`` (``Cond`` fields in brackets):

- ``sd``: CLIP last hidden state [embeddings] and its pooled output [pooled], as StableDiffusionPipeline.
- ``sdxl``, ``sd3``, ``flux``, ``pixart_alpha``, ``pixart_sigma``, ``sana``: the stock pipeline's own
  ``encode_prompt`` (the pipeline object is built in memory from the loaded components), so the teacher
  sees exactly what the stock pipeline feeds its denoiser: SDXL [embeddings = both CLIPs' penultimate
  states concatenated, pooled = CLIP-G projection, time_ids = (original, crop, target) size];
  SD3 [embeddings = CLIP-L|CLIP-G padded and T5 (zeros without T5), pooled = both projections];
  Flux [embeddings = T5, pooled = CLIP]; PixArt/Sana [embeddings = T5/Gemma2, attention_mask].
- Flux's guidance embedding (``guidance_embeds=True``, guidance-distilled teachers such as Flux-dev)
  is a teacher input [guidance]: a guided teacher prediction feeds the scale there in one pass instead
  of classifier-free guidance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fewstep.types import Cond

__all__ = [
    "FAMILIES",
    "Family",
    "FamilyError",
    "FolderInfo",
    "PromptEncoder",
    "detect_family",
    "family_for_model",
    "flow_config_for_family",
    "supported_summary",
]


class FamilyError(ValueError):
    """A checkpoint that fewstep cannot distil; the message names what was found and what is supported."""


@dataclass(frozen=True)
class Family:
    """One kind of teacher checkpoint.

    name: short id used in logs, model cards and recipes' comments.
    denoiser_class: the diffusers class of the denoiser (``config.json`` ``_class_name``).
    denoiser_component: the pipeline component (and subfolder) holding it: ``"unet"`` or ``"transformer"``.
    pipeline_class: the stock diffusers pipeline that loads an export of this family (None: no stock
        pipeline takes this denoiser as it is, e.g. a class-conditional UNet2DModel).
    conditioning: "none" | "class" | "text".
    text_components: ``(encoder, tokenizer)`` component pairs that must be present (text families).
    optional_text_components: pairs that may be absent (SD3's T5: the pipeline then feeds zeros).
    latent: the family works on VAE latents (a ``vae`` component is required).
    prompt_encoder: "clip" (one CLIP encoder, fewstep's own call) or "pipeline" (the stock pipeline's
        ``encode_prompt``, see the module docstring).
    packed_latents: Flux: the denoiser reads 2x2 patches packed into tokens with ``img_ids``/``txt_ids``;
        the backbone packs and unpacks, so methods still see (B, C, H, W) latents.
    timestep_scale: the denoiser is fed ``model_time * timestep_scale`` (Flux's transformer multiplies
        its timestep by 1000 itself, so it is fed t in [0, 1]).
    time_embedding: candidate ``(time_proj path, embedding path)`` pairs inside the denoiser: the first
        pair that exists is the seam of the extra scalar inputs (their zero-initialised embeddings are
        added to the output of the embedding module, built on the same sinusoidal features).
    bottleneck: path of the module whose output is the bottleneck feature map (``Backbone.bottleneck``);
        for transformers the image tokens of the last block.
    feature_levels: paths of the modules whose outputs are the feature levels of ``Backbone.features`` (a
        path naming a module list stands for each of its blocks): LADD's discriminator heads read one each.
        UNets: the mid block and every up block (4x4 to full resolution); transformers: every block's
        image tokens.
    output_layer: path of the denoiser's last layer (where an adaptive GAN weight compares gradient norms).
    input_layer: path of the layer that reads the latents (a Conv2d, or Flux's token Linear), widened by
        ``Backbone.add_input_channels``.
    max_sequence_length: the stock pipeline's default text length for the T5/Gemma encoder (None: the
        tokenizer's own model_max_length).
    default_sample_size: latent size (pixels / VAE factor) when the denoiser's config has none (Flux):
        the stock pipeline's ``default_sample_size``; the VAE config's ``sample_size`` wins when present.
    """

    name: str
    description: str
    denoiser_class: str
    denoiser_component: Literal["unet", "transformer"]
    pipeline_class: str | None
    conditioning: Literal["none", "class", "text"]
    text_components: tuple[tuple[str, str], ...] = ()
    optional_text_components: tuple[tuple[str, str], ...] = ()
    latent: bool = False
    prompt_encoder: Literal["clip", "pipeline"] | None = None
    packed_latents: bool = False
    timestep_scale: float = 1.0
    time_embedding: tuple[tuple[str, str], ...] = ()
    bottleneck: str = "mid_block"
    feature_levels: tuple[str, ...] = ("mid_block", "up_blocks")
    input_layer: str = "conv_in"
    output_layer: str = "proj_out"
    max_sequence_length: int | None = None
    default_sample_size: int | None = None


_UNET_TIME = (("time_proj", "time_embedding"),)

#: Every supported family, in the order ``detect_family`` reports them.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="pixel_unet",
            description="pixel-space UNet2DModel (DDPM / consistency-model style), unconditional or class labels",
            denoiser_class="UNet2DModel",
            denoiser_component="unet",
            pipeline_class="DDPMPipeline",
            conditioning="none",
            time_embedding=_UNET_TIME,
            output_layer="conv_out",
        ),
        Family(
            name="sd",
            description="Stable Diffusion 1.x / 2.x: UNet2DConditionModel + one CLIP text encoder",
            denoiser_class="UNet2DConditionModel",
            denoiser_component="unet",
            pipeline_class="StableDiffusionPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"),),
            latent=False,  # a VAE is optional: fewstep's own text teachers may be pixel-space
            prompt_encoder="clip",
            time_embedding=_UNET_TIME,
            output_layer="conv_out",
        ),
        Family(
            name="sdxl",
            description="Stable Diffusion XL base: UNet2DConditionModel (addition_embed_type='text_time') + "
            "CLIP-L and CLIP-G (with projection), pooled embeddings and size/crop time ids",
            denoiser_class="UNet2DConditionModel",
            denoiser_component="unet",
            pipeline_class="StableDiffusionXLPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
            latent=True,
            prompt_encoder="pipeline",
            time_embedding=_UNET_TIME,
            output_layer="conv_out",
        ),
        Family(
            name="sd3",
            description="Stable Diffusion 3 / 3.5: SD3Transformer2DModel + CLIP-L, CLIP-G and optional T5, "
            "flow matching with shift",
            denoiser_class="SD3Transformer2DModel",
            denoiser_component="transformer",
            pipeline_class="StableDiffusion3Pipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
            optional_text_components=(("text_encoder_3", "tokenizer_3"),),
            latent=True,
            prompt_encoder="pipeline",
            time_embedding=(("time_text_embed.time_proj", "time_text_embed.timestep_embedder"),),
            bottleneck="transformer_blocks.-1",
            feature_levels=("transformer_blocks",),
            max_sequence_length=256,
            input_layer="pos_embed.proj",
        ),
        Family(
            name="flux",
            description="Flux.1: FluxTransformer2DModel (packed 2x2 latents, img_ids/txt_ids) + CLIP (pooled) "
            "and T5, optional guidance embedding, flow matching with static or resolution-dependent shift",
            denoiser_class="FluxTransformer2DModel",
            denoiser_component="transformer",
            pipeline_class="FluxPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
            latent=True,
            prompt_encoder="pipeline",
            packed_latents=True,
            timestep_scale=1e-3,
            time_embedding=(("time_text_embed.time_proj", "time_text_embed.timestep_embedder"),),
            bottleneck="single_transformer_blocks.-1",
            feature_levels=("transformer_blocks", "single_transformer_blocks"),
            max_sequence_length=512,
            default_sample_size=128,
            input_layer="x_embedder",
        ),
        Family(
            name="pixart_alpha",
            description="PixArt-alpha: PixArtTransformer2DModel + T5 (resolution / aspect-ratio conditions when "
            "the config uses them)",
            denoiser_class="PixArtTransformer2DModel",
            denoiser_component="transformer",
            pipeline_class="PixArtAlphaPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"),),
            latent=True,
            prompt_encoder="pipeline",
            time_embedding=(("adaln_single.emb.time_proj", "adaln_single.emb.timestep_embedder"),),
            bottleneck="transformer_blocks.-1",
            feature_levels=("transformer_blocks",),
            max_sequence_length=120,
            input_layer="pos_embed.proj",
        ),
        Family(
            name="pixart_sigma",
            description="PixArt-sigma: PixArtTransformer2DModel + T5",
            denoiser_class="PixArtTransformer2DModel",
            denoiser_component="transformer",
            pipeline_class="PixArtSigmaPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"),),
            latent=True,
            prompt_encoder="pipeline",
            time_embedding=(("adaln_single.emb.time_proj", "adaln_single.emb.timestep_embedder"),),
            bottleneck="transformer_blocks.-1",
            feature_levels=("transformer_blocks",),
            max_sequence_length=300,
            input_layer="pos_embed.proj",
        ),
        Family(
            name="sana",
            description="Sana: SanaTransformer2DModel + Gemma2 text encoder + deep-compression VAE, flow matching",
            denoiser_class="SanaTransformer2DModel",
            denoiser_component="transformer",
            pipeline_class="SanaPipeline",
            conditioning="text",
            text_components=(("text_encoder", "tokenizer"),),
            latent=True,
            prompt_encoder="pipeline",
            time_embedding=(
                ("time_embed.emb.time_proj", "time_embed.emb.timestep_embedder"),
                ("time_embed.time_proj", "time_embed.timestep_embedder"),
            ),
            bottleneck="transformer_blocks.-1",
            feature_levels=("transformer_blocks",),
            input_layer="patch_embed.proj",
            max_sequence_length=300,
        ),
        Family(
            name="dit",
            description="DiT: DiTTransformer2DModel, class labels (ImageNet-style)",
            denoiser_class="DiTTransformer2DModel",
            denoiser_component="transformer",
            pipeline_class="DiTPipeline",
            conditioning="class",
            bottleneck="transformer_blocks.-1",
            feature_levels=("transformer_blocks",),
            input_layer="pos_embed.proj",
            output_layer="proj_out_2",
        ),
    )
}


#: Denoiser classes in the order error messages list them.
_CLASS_ORDER = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
                "FluxTransformer2DModel", "PixArtTransformer2DModel", "SanaTransformer2DModel")

SCHEDULER_HINT = (
    "add scheduler/scheduler_config.json describing the teacher's training noise schedule, e.g. "
    "`diffusers.DDPMScheduler(...).save_pretrained(folder / 'scheduler')` (or EDMEulerScheduler / "
    "FlowMatchEulerDiscreteScheduler for EDM / flow-matching teachers)"
)


def supported_summary() -> str:
    """One line listing the supported denoiser classes and families."""
    families = ", ".join(f"{f.name} ({f.pipeline_class or f.denoiser_class})" for f in FAMILIES.values())
    return f"denoisers {', '.join(_CLASS_ORDER)}; families {families}"


def _refuse(found: str, fix: str) -> FamilyError:
    return FamilyError(f"{found}. fewstep supports: {supported_summary()}. {fix}")


def family_for_model(class_name: str, config: dict[str, Any], index: dict[str, Any] | None = None) -> Family:
    """The family of a denoiser from its class name and config (and the pipeline's model_index.json
    when there is one); raises :class:`FamilyError` for configs no family covers."""
    if class_name == "UNet2DModel":
        return FAMILIES["pixel_unet"]
    if class_name == "DiTTransformer2DModel":
        return FAMILIES["dit"]
    if class_name == "UNet2DConditionModel":
        in_ch, out_ch = config.get("in_channels", 4), config.get("out_channels", 4)
        if in_ch != out_ch and out_ch != 2 * in_ch:  # 2x: a learned-variance output, not extra inputs
            raise _refuse(
                f"UNet2DConditionModel with in_channels={in_ch} and out_channels={out_ch} (an inpainting / "
                "image-conditioned UNet: extra mask or image channels)",
                "Distil the text-to-image checkpoint of the same model instead.",
            )
        embed = config.get("addition_embed_type")
        if embed is None:
            return FAMILIES["sd"]
        if embed != "text_time":
            raise _refuse(f"UNet2DConditionModel with addition_embed_type={embed!r}",
                          "Only SDXL's 'text_time' additional embedding is supported.")
        if index is not None:
            if index.get("requires_aesthetics_score") or (
                "text_encoder_2" in index and index.get("text_encoder") in (None, [None, None])
            ):
                raise _refuse(
                    "an SDXL refiner-style pipeline (requires_aesthetics_score, or text_encoder_2 without "
                    "text_encoder)", "Distil the SDXL base checkpoint (two text encoders, size/crop time ids) instead.",
                )
        return FAMILIES["sdxl"]
    if class_name == "SD3Transformer2DModel":
        return FAMILIES["sd3"]
    if class_name == "FluxTransformer2DModel":
        return FAMILIES["flux"]
    if class_name == "PixArtTransformer2DModel":
        pipeline = (index or {}).get("_class_name")
        return FAMILIES["pixart_alpha" if pipeline == "PixArtAlphaPipeline" else "pixart_sigma"]
    if class_name == "SanaTransformer2DModel":
        if config.get("guidance_embeds"):
            raise _refuse("SanaTransformer2DModel with guidance_embeds=True (Sana-Sprint, already a few-step model "
                          "with its own SanaSprintPipeline)", "Distil a Sana text-to-image checkpoint instead.")
        return FAMILIES["sana"]
    raise _refuse(f"denoiser class {class_name!r}",
                  "Point teacher.pretrained at a checkpoint whose unet/ or transformer/ config names one of these.")


@dataclass(frozen=True)
class FolderInfo:
    """What :func:`detect_family` read from a teacher folder.

    family: the family row. denoiser_dir: the denoiser's model folder. scheduler_config: the scheduler
    config as fewstep's noise process reads it (Flux's dynamic shift and Sana's DPM-Solver flow sigmas
    already turned into a static FlowMatchEulerDiscreteScheduler shift, see :func:`flow_config_for_family`).
    index: model_index.json contents ({} for a model folder). sample_size: the latent (or pixel) size
    the teacher works at.
    """

    family: Family
    root: Path
    denoiser_dir: Path
    scheduler_config: dict[str, Any]
    index: dict[str, Any]
    sample_size: int | None


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FamilyError(f"{path} is not valid JSON: {err}") from err


def _present(root: Path, index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    listed = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
    return listed and (root / component).is_dir()


def _vae_factor(vae_config: dict[str, Any]) -> int:
    blocks = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels") or ()
    return 2 ** (len(blocks) - 1) if blocks else 1


def flow_config_for_family(scheduler_config: dict[str, Any], image_seq_len: int | None) -> dict[str, Any]:
    """The scheduler config fewstep's flow process reads, for a teacher working at one resolution.

    - FlowMatchEulerDiscreteScheduler with ``use_dynamic_shifting`` (Flux-dev, SD3.5 at some sizes): the
      shift depends on the image's token count (``image_seq_len``); at a fixed resolution it is the static
      shift ``exp(mu)`` ('exponential' time_shift_type) or ``mu`` ('linear'), with mu interpolated linearly
      between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) as FluxPipeline's
      ``calculate_shift`` does. The result keeps ``_class_name`` and sets ``use_dynamic_shifting: False``.
    - DPMSolverMultistepScheduler with ``use_flow_sigmas`` and ``prediction_type='flow_prediction'`` (Sana):
      the same rectified-flow process with shift ``flow_shift``.
    Other configs are returned unchanged.
    """
    cfg = dict(scheduler_config)
    name = cfg.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler" and cfg.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise FamilyError("the scheduler uses dynamic shifting, which depends on the image size, but the teacher's "
                              "sample size is unknown; add {\"sample_size\": <latent size>} to fewstep_teacher.json")
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * slope + base_shift - slope * base_len  # FluxPipeline calculate_shift
        kind = cfg.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise FamilyError(f"scheduler time_shift_type={kind!r} is not supported (only 'exponential' / 'linear')")
        cfg["shift"] = math.exp(mu) if kind == "exponential" else mu
        cfg["use_dynamic_shifting"] = False
        cfg["_fewstep_dynamic_shift"] = {"mu": mu, "image_seq_len": image_seq_len}
    elif name == "DPMSolverMultistepScheduler" and cfg.get("use_flow_sigmas"):
        if cfg.get("prediction_type") != "flow_prediction":
            raise FamilyError(f"DPMSolverMultistepScheduler with use_flow_sigmas needs prediction_type "
                              f"'flow_prediction', got {cfg.get('prediction_type')!r}")
        cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler",
               "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
               "shift": cfg.get("flow_shift") or 1.0, "use_dynamic_shifting": False,
               "_fewstep_from": "DPMSolverMultistepScheduler(use_flow_sigmas)"}
    return cfg


def detect_family(path: str | Path) -> FolderInfo:
    """Read a teacher folder's JSON configs (no weights) and return its family, or raise
    :class:`FamilyError` (missing folder, unknown denoiser, missing encoder, inpainting UNet, refiner...).

    Layouts: a pipeline folder (``model_index.json``, denoiser in ``unet/`` or ``transformer/``) or a
    model folder (``config.json`` and a scheduler config beside it, in ``scheduler/`` inside it, or in
    ``../scheduler/``); see :mod:`fewstep.teacher`.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"teacher folder not found: {root}; teacher.pretrained must be a local diffusers "
                                "folder (nothing is downloaded)")
    meta_file = root / "fewstep_teacher.json"
    meta = _read(meta_file) if meta_file.is_file() else {}
    index: dict[str, Any] = {}
    if (root / "model_index.json").is_file():
        index = _read(root / "model_index.json")
        sub = next((s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None)
        if sub is None:
            raise FileNotFoundError(f"pipeline folder {root} has no unet/config.json or transformer/config.json; "
                                    "fewstep needs the denoiser in one of those subfolders")
        denoiser_dir = root / sub
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        candidates = [scheduler_file]
    elif (root / "config.json").is_file():
        denoiser_dir = root
        candidates = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json",
                      root.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise FileNotFoundError(f"{root} is not a diffusers folder: it has neither model_index.json (a pipeline) "
                                "nor config.json (a model); point teacher.pretrained at the folder that contains one")
    config = _read(denoiser_dir / "config.json")
    backbone_meta = denoiser_dir / "fewstep_backbone.json"
    extra = _read(backbone_meta).get("extra_channels", 0) if backbone_meta.is_file() else 0
    if extra and config.get("in_channels") is not None:  # fewstep's own extra input channels are not inpainting
        packed = 4 if config.get("_class_name") == "FluxTransformer2DModel" else 1
        config = {**config, "in_channels": config["in_channels"] - extra * packed}
    family = family_for_model(str(config.get("_class_name")), config, index or None)
    scheduler_file = next((c for c in candidates if c.is_file()), None)
    if scheduler_file is None:
        raise FileNotFoundError(f"teacher {root}: no scheduler config (looked at {', '.join(map(str, candidates))}); "
                                f"{SCHEDULER_HINT}")
    if index and family.denoiser_component != denoiser_dir.name:
        raise FamilyError(f"{root}: the {family.denoiser_class} is in {denoiser_dir.name}/, but its pipelines keep it "
                          f"in {family.denoiser_component}/")

    if index:
        missing = [f"{enc} + {tok}" for enc, tok in family.text_components
                   if not (_present(root, index, enc) and _present(root, index, tok))]
        if missing:
            raise FamilyError(f"{root} is a {family.name} checkpoint ({family.description}) but lacks "
                              f"{', '.join(missing)} (components listed in model_index.json with a folder each); "
                              "copy them from the original pipeline folder")
        if family.latent and not _present(root, index, "vae"):
            raise FamilyError(f"{root} is a {family.name} checkpoint but has no vae/ component; copy it from the "
                              "original pipeline folder")

    vae_config = _read(root / "vae" / "config.json") if (root / "vae" / "config.json").is_file() else None
    sample_size = meta.get("sample_size") or config.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    if sample_size is None and vae_config is not None and vae_config.get("sample_size"):
        vs = vae_config["sample_size"]
        sample_size = (vs[0] if isinstance(vs, (list, tuple)) else vs) // _vae_factor(vae_config)
    if sample_size is None:
        sample_size = family.default_sample_size
    if family.packed_latents and vae_config is not None:
        latent_channels = vae_config.get("latent_channels", 16)
        if config.get("in_channels") != 4 * latent_channels:
            raise _refuse(f"{family.denoiser_class} with in_channels={config.get('in_channels')} for a VAE with "
                          f"{latent_channels} latent channels (a Fill / Depth / Redux-style variant with extra "
                          f"image channels; text-to-image Flux has 4 x {latent_channels})",
                          "Distil the text-to-image checkpoint instead.")
    seq_len = None
    if sample_size is not None:
        patch = 2 if family.packed_latents else int(config.get("patch_size") or 1)
        seq_len = (int(sample_size) // patch) ** 2
    scheduler = flow_config_for_family(_read(scheduler_file), seq_len)
    return FolderInfo(family, root, denoiser_dir, scheduler, index, None if sample_size is None else int(sample_size))


# ------------------------------------------------------------------------------------------------
# Prompts -> Cond


class PromptEncoder:
    """Turns prompts into the :class:`~fewstep.types.Cond` a family's denoiser reads.

    components: the loaded pipeline components (``text_encoder``, ``tokenizer``, ``text_encoder_2``...,
    ``vae``, the denoiser model under its component name, ``scheduler``). For ``prompt_encoder ==
    "pipeline"`` families the stock pipeline (``family.pipeline_class``) is built in memory from these
    same objects and its ``encode_prompt`` is called, so prompts are tokenised, truncated, padded and
    pooled exactly as the stock pipeline does. ``image_size``: the pixel (height, width) the teacher
    generates at, for size conditions (SDXL time ids, PixArt-alpha resolution).
    """

    def __init__(self, family: Family, components: dict[str, Any], image_size: tuple[int, int],
                 index: dict[str, Any] | None = None, max_sequence_length: int | None = None) -> None:
        self.family = family
        self.components = components
        self.image_size = image_size
        self.max_sequence_length = max_sequence_length or family.max_sequence_length
        self.pipeline: Any = None
        if family.prompt_encoder == "pipeline":
            import inspect

            import diffusers

            cls = getattr(diffusers, str(family.pipeline_class))
            params = inspect.signature(cls.__init__).parameters
            flags = ("force_zeros_for_empty_prompt", "add_watermarker")
            kwargs = {k: components.get(k) for k in list(params)[1:] if k not in flags}
            if "force_zeros_for_empty_prompt" in params:
                kwargs["force_zeros_for_empty_prompt"] = bool((index or {}).get("force_zeros_for_empty_prompt", True))
            if "add_watermarker" in params:
                kwargs["add_watermarker"] = False
            self.pipeline = cls(**kwargs)
            self.pipeline.set_progress_bar_config(disable=True)

    @property
    def encoders(self) -> list[Any]:
        """The text encoder modules (to move, cast and freeze with the teacher)."""
        names = [enc for enc, _ in (*self.family.text_components, *self.family.optional_text_components)]
        return [self.components[n] for n in names if self.components.get(n) is not None]

    def encode(self, prompts: list[str], device: Any, dtype: Any, *, negative: bool = False) -> Cond:
        """prompts -> Cond for ``len(prompts)`` samples. negative: the stock pipeline's unconditional
        (negative-prompt "") embedding instead, e.g. SDXL's zeros when ``force_zeros_for_empty_prompt``."""
        import torch

        from fewstep.types import Cond

        n = len(prompts)
        fam, pipe, length = self.family.name, self.pipeline, self.max_sequence_length
        mask = added = None
        if self.family.prompt_encoder == "clip":
            tok, enc = self.components["tokenizer"], self.components["text_encoder"]
            ids = tok([""] * n if negative else prompts, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            out = enc(ids.to(device))
            embeds, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
        elif fam == "sdxl":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=[""] * n if negative else prompts,
                                                                 device=device, do_classifier_free_guidance=negative)
            if negative:
                embeds, pooled = neg, neg_pooled
            size = tuple(self.image_size)
            added = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=int(
                self.components["text_encoder_2"].config.projection_dim)).to(device).repeat(n, 1)
        elif fam == "sd3":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=[""] * n if negative else prompts, prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=negative, max_sequence_length=length)
            if negative:
                embeds, pooled = neg, neg_pooled
        elif fam == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=[""] * n if negative else prompts, prompt_2=None,
                                                   device=device, max_sequence_length=length)
        elif fam in ("pixart_alpha", "pixart_sigma"):
            # clean_caption=False: the stock pipeline's own fallback when beautifulsoup4/ftfy are absent.
            embeds, mask, _, _ = pipe.encode_prompt([""] * n if negative else prompts, do_classifier_free_guidance=False,
                                                    device=device, clean_caption=False, max_sequence_length=length)
            pooled = None
            if self.components["transformer"].use_additional_conditions:
                h, w = self.image_size
                added = torch.tensor([[float(h), float(w), h / w]], device=device).repeat(n, 1)
        elif fam == "sana":
            # SanaPipeline prefixes prompts with its default complex_human_instruction (not negative prompts).
            instruction = None if negative else _sana_default_instruction()
            embeds, mask, _, _ = pipe.encode_prompt([""] * n if negative else prompts, do_classifier_free_guidance=False,
                                                    device=device, clean_caption=False, max_sequence_length=length,
                                                    complex_human_instruction=instruction)
            pooled = None
        else:
            raise ValueError(f"family {fam!r} has no prompt encoder")
        return Cond(embeddings=embeds.to(device, dtype), pooled=None if pooled is None else pooled.to(device, dtype),
                    attention_mask=None if mask is None else mask.to(device).long(),
                    added=None if added is None else added.to(device, dtype),
                    prompts=tuple([""] * n if negative else prompts))


def _sana_default_instruction() -> list[str] | None:
    import inspect

    import diffusers

    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
