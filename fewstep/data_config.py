"""The data section of a recipe and the checks of it that need no data loaded: import-light (pydantic and the
standard library), so ``fewstep validate`` runs without torch, numpy or scikit-learn. :mod:`fewstep.data`
re-exports every name here and holds the data sets themselves.

The embedded digits set is described by constants (:func:`digits_summary`) instead of being loaded; other
sources are built by :func:`fewstep.data.build_data` when :func:`check_data` needs their shape or labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DataConfig", "DataSummary", "TeacherInfo", "check_data", "check_in_memory_options", "digits_summary",
           "reject_unused", "require_source", "run_teacher_info", "teacher_info"]

# scikit-learn's load_digits: 1797 images of 8x8 pixels with values 0..16, labels 0..9 (fixed since its first
# release; tests/test_data_config.py compares these with the loaded set).
DIGITS_RESOLUTION = 8
DIGITS_CLASSES = 10


class DataConfig(BaseModel):
    """Where the training data comes from and how it is shaped before the teacher sees it."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "digits",
        description="'digits' (scikit-learn load_digits, the embedded default: 1797 8x8 images, 10 classes; "
        "takes precedence over a file of that name) or a path to: an image folder (PNG/JPG/..., optionally "
        "one level of class subfolders whose sorted names give labels 0..K-1), a .npz file, an idx/idx.gz "
        "images file (MNIST format), or a prompt list (.txt one prompt per line, blank lines ignored, or "
        ".json list of strings) for text-only distillation. Relative paths resolve against the recipe's folder.",
    )
    labels: str | None = Field(
        None,
        description="idx(.gz) labels file paired with an idx images source. Default None looks for the "
        "conventional sibling (train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz) and goes without "
        "labels when there is none.",
    )
    images_key: str | None = Field(
        None,
        description="Array name of the images in a .npz source; default None tries x_train, x, images, arr_0.",
    )
    labels_key: str | None = Field(
        None, description="Array name of the labels in a .npz source; default None tries y_train, y, labels."
    )
    prompts: str | None = Field(
        None,
        description="Prompt list (.txt or .json) paired with an image source, one prompt per source image "
        "in the source's order. Default None: no prompts. For prompts alone, give the list as `source`.",
    )
    resolution: int | None = Field(
        None,
        ge=1,
        description="Square size in pixels to resize to (non-square images are centre-cropped first; "
        "bilinear with antialias). Default None keeps the native size. Ignored for a prompt-only source.",
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="Convert to this many channels: gray -> RGB repeats, RGB -> gray uses the ITU-R 601 "
        "luminance (0.299, 0.587, 0.114). Default None keeps the native count.",
    )
    class_conditional: bool | None = Field(
        None,
        description="Return class labels with each batch; building fails if the source has none. Default None "
        "follows the teacher (labels for a class-conditional teacher, none otherwise); false with a "
        "class-conditional teacher is refused.",
    )
    flip: bool = Field(
        False,
        description="Random horizontal flips as augmentation (default off, as for digits and MNIST). The "
        "caller draws the mask from IndexStream.flips and passes it to Dataset.get.",
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Keep only the first `limit` items in the source's order, for quick runs. Default None keeps all.",
    )
    pairs: str | None = Field(
        None,
        description="Folder of teacher noise-image couplings written by `fewstep pairs` (DMD regression, CAF, "
        "reflow); every batch then also carries a batch of pairs in their own seeded order. Default None: no "
        "pairs. Relative paths resolve against the recipe's folder.",
    )
    caption_column: str | None = Field(
        None,
        description="Caption column of a metadata.jsonl/.csv, datasets or webdataset-json source. Default None "
        "tries text, caption, prompt (a webdataset sample's .txt member comes first).",
    )
    label_column: str | None = Field(
        None,
        description="Class-label column (integer ids 0..K-1) of a metadata, datasets or webdataset-json source. "
        "Default None tries label, labels, class (a webdataset sample's .cls member comes first).",
    )
    negative_column: str | None = Field(
        None,
        description="Per-sample negative prompt column; the batch's uncond is then the negative prompt (CFG "
        "against it). Default None uses negative_prompt or negative when present.",
    )
    image_column: str | None = Field(
        None, description="Image column of a datasets source. Default None tries image, img, png, jpg."
    )
    split: str = Field("train", description="Split of a saved DatasetDict folder; 'train' by convention.")
    num_classes: int | None = Field(
        None,
        ge=1,
        description="Number of classes of a webdataset source (its labels are not scanned ahead of training). "
        "Default None: only needed for class-conditional runs on shards.",
    )
    crop: Literal["center", "random"] = Field(
        "center",
        description="After resizing the short side to cover the target size: take the centre (default, as in "
        "diffusers' training scripts) or a random window drawn from (seed, images seen). Sources read per batch "
        "only (metadata folders, datasets, webdataset).",
    )
    buckets: list[tuple[int, int]] | None = Field(
        None,
        description="Aspect-ratio buckets as (height, width) pixel sizes, e.g. [[1024, 1024], [896, 1152], "
        "[1152, 896]] for SDXL-style teachers: each image goes to the bucket of nearest aspect ratio and every "
        "global micro-batch comes from one bucket. Default None: square data.resolution. Indexable sources only "
        "(metadata folders, datasets).",
    )
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability that a sample's caption is replaced by the empty prompt (the teacher's null "
        "condition), drawn from (seed, images seen); for CFG-aware training. Default 0: never.",
    )
    cache: str = Field(
        "auto",
        description="Cache of VAE latents and text embeddings for sources read per batch: 'auto' (default) "
        "builds it on first use in the user cache folder (fewstep.paths.cache_dir) and reads it afterwards; a "
        "path names the cache folder; 'off' encodes live every batch. `fewstep cache RECIPE` builds it ahead.",
    )
    cache_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Storage type of cached latents and embeddings; float16 halves the disk (SD text "
        "embeddings are 77x768 values per caption). Default float32: exact.",
    )


def reject_unused(cfg: DataConfig, kind: str, fields: tuple[str, ...]) -> None:
    for f in fields:
        if getattr(cfg, f):
            raise ValueError(f"data.{f} is set but has no meaning for {kind} ('{cfg.source}'); remove it")


def check_in_memory_options(cfg: DataConfig, kind: str) -> None:
    """Refuse options of sources read per batch on a ``kind`` of source read into memory (digits, folder, npz,
    idx, prompts), where they would be ignored."""
    if cfg.buckets or cfg.crop == "random":
        raise ValueError(f"data.buckets / data.crop: random apply to sources read per batch (metadata folders, "
                         f"datasets, webdataset shards); '{cfg.source}' is a {kind} source read into memory")
    per_batch_only = ("caption_column", "label_column", "negative_column", "image_column", "num_classes", "split",
                      "cache", "cache_dtype")
    if given := [f for f in per_batch_only if getattr(cfg, f) != DataConfig.model_fields[f].default]:
        raise ValueError(f"data.{given[0]} is set but '{cfg.source}' is a {kind} source read into memory, where it "
                         "has no meaning (it applies to metadata folders, datasets and webdataset shards); remove it")


@dataclass(frozen=True)
class DataSummary:
    """What :func:`check_data` reads of a data set without its images: shape (C, H, W) of the images (None for
    prompts alone), number of classes (None: no labels) and whether it has captions."""

    shape: tuple[int, int, int] | None
    num_classes: int | None
    has_captions: bool


def digits_summary(cfg: DataConfig) -> DataSummary | None:
    """What :func:`fewstep.data.build_data` gives for ``cfg`` on the embedded digits, with the same refusals of
    options that do not apply, without loading scikit-learn or torch. None for any other source, and where only
    loading tells (``data.prompts``, whose count must match the images; a channel count the loader would refuse)."""
    if cfg.source != "digits" or cfg.prompts is not None or cfg.channels not in (None, 1, 3):
        return None
    check_in_memory_options(cfg, "digits")
    reject_unused(cfg, kind="the digits source", fields=("labels", "images_key", "labels_key"))
    size = cfg.resolution or DIGITS_RESOLUTION
    return DataSummary((cfg.channels or 1, size, size), DIGITS_CLASSES, has_captions=False)


@dataclass(frozen=True)
class TeacherInfo:
    """What :func:`check_data` needs to know of a teacher, read from its folder's JSON configs (no weights).

    conditioning: "none" | "class" | "text"; num_classes: real classes or None; data_shape: (C, H, W) of the
    images it generates; vae_factor: the VAE's downsampling factor (1 for a pixel teacher).
    """

    conditioning: str
    num_classes: int | None
    data_shape: tuple[int, int, int]
    vae_factor: int = 1


def teacher_info(path: str | Path) -> TeacherInfo:
    """:class:`TeacherInfo` of a local teacher folder (fewstep.families.detect_family reads the layout)."""
    from fewstep.families import detect_family

    info = detect_family(path)
    denoiser = json.loads((info.denoiser_dir / "config.json").read_text())
    meta_file = info.root / "fewstep_teacher.json"
    num_classes = json.loads(meta_file.read_text()).get("num_classes") if meta_file.is_file() else None
    conditioning = info.family.conditioning
    if conditioning == "none" and (denoiser.get("num_class_embeds") or denoiser.get("class_embed_type")):
        conditioning = "class"  # a UNet2DModel with a label table (fewstep.backbones reads it the same way)
    if num_classes is None and conditioning == "class":
        rows = denoiser.get("num_class_embeds") or denoiser.get("num_embeds_ada_norm")
        num_classes = int(rows) if rows else None
    size = int(info.sample_size or denoiser.get("sample_size") or 0)
    vae_file = info.root / "vae" / "config.json"
    if vae_file.is_file():
        vae = json.loads(vae_file.read_text())
        blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0]  # KL or DC (Sana)
        factor = 2 ** (len(blocks) - 1)
        shape = (int(vae.get("in_channels", 3)), size * factor, size * factor)
    else:
        factor = 1
        shape = (int(denoiser.get("in_channels", 3)), size, size)
    return TeacherInfo(conditioning, num_classes, shape, factor)



def run_teacher_info(config: Any) -> TeacherInfo | None:
    """:func:`teacher_info` of the run's ``teacher.pretrained`` for a method's pre-build checks
    (``fewstep_configure``), or None when none is set or the folder cannot be read: the input checks report
    that, with their own fix."""
    if config.teacher.pretrained is None:
        return None
    try:
        return teacher_info(config.teacher.pretrained)
    except (OSError, ValueError):
        return None

def check_data(config: Any, teacher: Any, dataset: Any = None) -> None:
    """Refuse data that cannot train ``teacher`` (a :class:`fewstep.teacher.Teacher` or a :class:`TeacherInfo`): a text teacher without captions, a
    class teacher without labels or with labels out of its range, or images of another channel count or
    resolution than the teacher's. ``dataset`` is built from ``config.data`` when not given (the
    ``validate`` command). Raises ValueError naming the problem and the fix."""
    cfg: DataConfig = config.data
    require_source(cfg, config.teacher.pretrained)
    c, h, w = teacher.data_shape
    where = f"data.source '{cfg.source}'"
    if cfg.channels is not None and cfg.channels != c:
        raise ValueError(f"data.channels={cfg.channels} but the teacher takes {c}-channel images; remove "
                         f"data.channels or set it to {c}")
    if cfg.resolution is not None and cfg.resolution != h and not cfg.buckets:
        raise ValueError(f"data.resolution={cfg.resolution} but the teacher generates {h}x{w} images; remove "
                         f"data.resolution or set it to {h}")
    vae = getattr(teacher, "vae", None)
    factor = getattr(teacher, "vae_factor", None) or (2 ** (len(vae.config.block_out_channels) - 1) if vae else 1)
    if cfg.buckets and factor > 1:
        bad = [b for b in cfg.buckets if b[0] % factor or b[1] % factor]
        if bad:
            raise ValueError(f"data.buckets {bad} are not multiples of the VAE's downsampling factor {factor}")
    if dataset is None:
        update: dict[str, Any] = {"resolution": cfg.resolution or h, "channels": cfg.channels or c}
        if teacher.conditioning == "class":
            update["class_conditional"] = True
        dataset = digits_summary(cfg.model_copy(update=update))
        if dataset is None:
            from fewstep.data import build_data
            from fewstep.paths import cache_dir

            dataset = build_data(cfg.model_copy(update=update), cache_root=cache_dir())  # shard counts: memoised
    shape = getattr(dataset, "data_shape", None) or dataset.shape
    if shape is not None and tuple(shape)[0] != c:
        raise ValueError(f"{where} holds {shape[0]}-channel images but the teacher takes {c} channels; set "
                         f"data.channels: {c} to convert them")
    if teacher.conditioning == "text" and not dataset.has_captions:
        raise ValueError(f"the teacher is text-conditional but {where} has no captions, so every sample would be "
                         "trained on the empty prompt; give a captioned source (metadata.jsonl/.csv, datasets or "
                         "webdataset with a caption column: data.caption_column), data.prompts, or a prompt list")
    if teacher.conditioning == "class":
        classes = dataset.num_classes
        if classes is None:
            raise ValueError(f"the teacher is class-conditional but {where} has no labels; give a labelled source "
                             "(class subfolders, a label column: data.label_column, idx/npz labels)")
        if teacher.num_classes is not None and classes > teacher.num_classes:
            raise ValueError(f"{where} has labels up to {classes - 1} but the teacher knows {teacher.num_classes} "
                             "classes (0..{}); give data with the teacher's classes".format(teacher.num_classes - 1))


def require_source(cfg: DataConfig, teacher_pretrained: Path | None) -> None:
    """Refuse a recipe that names its own teacher but no ``data.source`` (it would silently train on the
    embedded digits). The teachers shipped in this repository's recipes/digits/ are exempt."""
    if teacher_pretrained is None or "source" in cfg.model_fields_set:
        return
    shipped = Path(__file__).resolve().parent.parent / "recipes" / "digits"
    if Path(teacher_pretrained).resolve().is_relative_to(shipped):
        return
    raise ValueError(f"data.source: required when teacher.pretrained is your own teacher ({teacher_pretrained}); "
                     "without it the run would train on the embedded digits. Set data.source to the teacher's data "
                     "(or to 'digits' on purpose)")
