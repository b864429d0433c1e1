"""Training data: in-memory image sets, sources read per batch, prompt lists, latent caches and the stream.

Small sets (scikit-learn digits, image folders without metadata, .npz, idx/MNIST, prompt lists) are loaded
once by :func:`build_dataset` into one float32 tensor (N, C, H, W) in [-1, 1], already resized and
channel-converted: fine up to about 100 000 small (<= 64x64) images. Caption data at scale (an image folder
with metadata.jsonl/.csv, a local Hugging Face ``datasets`` set, webdataset shards; :mod:`fewstep.sources`)
is a :class:`RecordDataset`: images are decoded, resized and cropped per batch, and VAE latents and text
embeddings can be cached on disk (:mod:`fewstep.cache`). :func:`build_data` picks the kind from the path.

Which samples a step sees is decided by :class:`DataStream` (:class:`IndexStream`, :class:`BucketStream` or
:class:`fewstep.sources.ShardStream`), a pure function of (seed, images seen), so a resumed run replays exactly
the same batches, flips, crops and caption dropouts, and ranks split each global batch. docs/DATA.md.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.data_config import (  # import-light: the recipe's data section and its checks (fewstep validate)
    DataConfig,
    TeacherInfo,
    check_data,
    check_in_memory_options,
    reject_unused,
    require_source,
    teacher_info,
)
from fewstep.types import Cond

__all__ = [
    "BucketStream",
    "DataConfig",
    "DataStream",
    "Dataset",
    "IndexStream",
    "LatentDataset",
    "RecordDataset",
    "Samples",
    "TeacherInfo",
    "build_data",
    "build_dataset",
    "check_data",
    "digits_array",
    "encode_latents",
    "load_image",
    "open_source",
    "require_source",
    "source_kind",
    "teacher_info",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_NPZ_IMAGE_KEYS = ("x_train", "x", "images", "arr_0")
_NPZ_LABEL_KEYS = ("y_train", "y", "labels")
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_CHUNK = 4096  # images converted / resized at a time, to bound the float32 working memory
_SOURCE_HINT = "give 'digits' or a path to an image folder, .npz, idx(.gz) file or prompt list (.txt/.json)"


class Dataset:
    """A data set held in memory.

    images: (N, C, H, W) float32 in [-1, 1], or None for a prompt-only source.
    labels: (N,) int64 class ids, or None. They are returned by :meth:`get` only when ``class_conditional``.
    prompts: N prompts, or None.
    """

    def __init__(
        self,
        name: str,
        images: Tensor | None,
        labels: Tensor | None = None,
        prompts: tuple[str, ...] | None = None,
        *,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        class_conditional: bool = False,
        flip: bool = False,
    ) -> None:
        self.name = name
        self.images = images
        self.labels = labels
        self.prompts = prompts
        self.num_classes = num_classes
        self.class_names = class_names
        self.class_conditional = class_conditional
        self.flip = flip
        self.has_images = images is not None
        self.has_captions = prompts is not None
        self.shape: tuple[int, int, int] | None = None  # (C, H, W); None for a prompt-only source
        if images is not None:
            c, h, w = images.shape[1:]
            self.shape = (c, h, w)

    def __len__(self) -> int:
        if self.images is not None:
            return self.images.shape[0]
        assert self.prompts is not None
        return len(self.prompts)

    def get(
        self, idx: Tensor, flip: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, tuple[str, ...] | None]:
        """Gather a batch.

        idx: (B,) int64 indices. flip: (B,) bool, True where the image is mirrored horizontally, or None.
        Returns x: (B, C, H, W) float32 or None, labels: (B,) int64 or None (None unless
        class_conditional), prompts: B strings or None.
        """
        x = None
        if self.images is not None:
            x = self.images[idx]
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        labels = self.labels[idx] if (self.class_conditional and self.labels is not None) else None
        prompts = tuple(self.prompts[i] for i in idx.tolist()) if self.prompts is not None else None
        return x, labels, prompts

    def describe(self) -> str:
        """One line for logs, e.g. ``digits: 1797 images 1x16x16, 10 classes``."""
        if self.shape is None:
            return f"{self.name}: {len(self)} prompts"
        text = f"{self.name}: {len(self)} images {'x'.join(map(str, self.shape))}"
        if self.num_classes is not None:
            text += f", {self.num_classes} classes"
        if self.prompts is not None:
            text += ", with prompts"
        return text


class LatentDataset(Dataset):
    """A :class:`Dataset` whose images were replaced by VAE latents (see :func:`encode_latents`).

    latents: (N, c, h, w) float32 in the teacher's latent scale (not [-1, 1]). Labels and prompts are the
    base set's. A flip mirrors the latent horizontally; this is the usual approximation of encoding the
    mirrored image (exact only for a VAE that commutes with mirroring, close for convolutional ones).
    """

    def __init__(self, base: Dataset, latents: Tensor) -> None:
        super().__init__(
            base.name,
            latents,
            base.labels,
            base.prompts,
            num_classes=base.num_classes,
            class_names=base.class_names,
            class_conditional=base.class_conditional,
            flip=base.flip,
        )
        self.base = base
        self.data_shape = base.shape

    def describe(self) -> str:
        assert self.shape is not None
        return f"{self.base.describe()}; latents {'x'.join(map(str, self.shape))}"


def digits_array() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 with values 0..16, labels (1797,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def build_dataset(cfg: DataConfig, base_dir: Path | None = None) -> Dataset | RecordDataset:
    """Load ``cfg.source`` into memory; relative paths resolve against ``base_dir`` (else the CWD). A source read
    per batch (metadata folder, datasets, webdataset shards) gives its :class:`RecordDataset` instead (same
    ``get`` interface), so any caller, e.g. an evaluation reference, can name one."""
    base = Path.cwd() if base_dir is None else Path(base_dir)
    if cfg.source != "digits" and source_kind(cfg, base) in PER_BATCH_KINDS:
        from fewstep.paths import cache_dir

        return build_data(cfg, base, cache_root=cache_dir())
    num_classes: int | None = None
    labels: np.ndarray | None = None
    if cfg.source == "digits":
        reject_unused(cfg, kind="the digits source", fields=("labels", "images_key", "labels_key"))
        raw, labels = digits_array()
        images, full_scale, name = raw[:, None], 16.0, "digits"
    else:
        path = _resolve(cfg.source, base, "data.source", _SOURCE_HINT)
        name = path.name
        kind = _source_kind(path)
        if kind == "prompts":
            reject_unused(
                cfg, kind="a prompt-list source", fields=("labels", "images_key", "labels_key", "prompts")
            )
            _require_labels(cfg, False, name, " (it is a prompt list)")
            prompts = read_prompts(path, "data.source")
            if cfg.limit is not None:
                prompts = prompts[: cfg.limit]
            return Dataset(name, None, None, prompts)
        if kind == "folder":
            reject_unused(cfg, kind="an image folder", fields=("labels", "images_key", "labels_key"))
            return _folder_dataset(cfg, path, base)
        if kind == "npz":
            reject_unused(cfg, kind="a .npz source", fields=("labels",))
            images, labels = _read_npz(path, cfg.images_key, cfg.labels_key)
        else:
            reject_unused(cfg, kind="an idx source", fields=("images_key", "labels_key"))
            images = _read_idx(path, _IDX_IMAGES_MAGIC, "data.source")[:, None]
            labels = _idx_labels(cfg, path, base, len(images))
        full_scale = _full_scale(images, str(path))
    if labels is not None:
        num_classes = _check_labels(labels, len(images), name)
    prompts = _paired_prompts(cfg, base, len(images))
    if cfg.limit is not None:
        images = images[: cfg.limit]
        labels = labels[: cfg.limit] if labels is not None else None
        prompts = prompts[: cfg.limit] if prompts is not None else None
    _require_labels(cfg, labels is not None, name)
    x = _to_model_space(images, full_scale, cfg.channels, cfg.resolution)
    return Dataset(
        name,
        x,
        torch.from_numpy(labels.astype(np.int64)) if labels is not None else None,
        prompts,
        num_classes=num_classes,
        class_conditional=cfg.class_conditional,
        flip=cfg.flip,
    )


def encode_latents(
    dataset: Dataset,
    encode: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 64,
    cache_path: Path | None = None,
    fingerprint: str = "",
) -> LatentDataset:
    """Encode every image of ``dataset`` once, optionally through a safetensors cache.

    encode: maps (B, C, H, W) images in [-1, 1] to (B, c, h, w) latents (the teacher supplies it, e.g.
    the VAE posterior mean times its scaling factor). fingerprint: a string the caller builds from the
    VAE and data config; a cache written under another fingerprint (or for another set size) is
    re-encoded and overwritten.
    """
    if dataset.images is None:
        raise ValueError(
            f"encode_latents: '{dataset.name}' is a prompt-only source and has no images to encode"
        )
    if batch_size < 1:
        raise ValueError(f"encode_latents: batch_size must be >= 1, got {batch_size}")
    if cache_path is not None and cache_path.exists():
        latents = _load_cache(cache_path, fingerprint, len(dataset))
        if latents is not None:
            return LatentDataset(dataset, latents)
    chunks = []
    with torch.no_grad():
        for lo in range(0, len(dataset), batch_size):
            batch = dataset.images[lo : lo + batch_size]
            z = encode(batch)
            if z.ndim != 4 or z.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"encode_latents: encode returned shape {tuple(z.shape)} for a batch of shape "
                    f"{tuple(batch.shape)}; it must return (B, c, h, w) latents, one per image"
                )
            chunks.append(z.detach().to("cpu", torch.float32))
    latents = torch.cat(chunks).contiguous()
    if cache_path is not None:
        _write_cache(cache_path, latents, fingerprint)
    return LatentDataset(dataset, latents)


class IndexStream:
    """Deterministic infinite stream of global sample indices: epochs are random permutations seeded by (seed, epoch).

    Stream position p (the number of images seen before it) holds sample ``perm(epoch=p // n)[p % n]``.
    Everything is a pure function of (n, seed, position), so a resumed run replays exactly.
    """

    _FLIP_BLOCK = 4096  # flips are drawn per block of positions, independent of n

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"IndexStream: the data set is empty (n={n}); check data.source and data.limit")
        if seed < 0:
            raise ValueError(f"IndexStream: seed must be >= 0, got {seed}")
        self.n = n
        self.seed = seed

    def indices(self, start: int, count: int) -> Tensor:
        """(count,) int64 sample indices at stream positions [start, start + count)."""
        _check_span(start, count)
        parts = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, end - pos)
            parts.append(_permutation(self.n, self.seed, epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def flips(self, start: int, count: int) -> Tensor:
        """(count,) bool horizontal-flip decisions at stream positions [start, start + count), about half True."""
        _check_span(start, count)
        parts = []
        pos, end = start, start + count
        while pos < end:
            block, offset = divmod(pos, self._FLIP_BLOCK)
            take = min(self._FLIP_BLOCK - offset, end - pos)
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, block, 1))
            parts.append(torch.rand(self._FLIP_BLOCK, generator=gen)[offset : offset + take] < 0.5)
            pos += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)


def _check_span(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"IndexStream: start and count must be >= 0, got start={start}, count={count}")


def _mix_seed(*words: int) -> int:
    """One 63-bit generator seed from several integers, well mixed (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    # Cached: a run asks for the same epoch's permutation at every step.
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(seed, epoch, 0)))


def _resolve(value: str, base: Path, field: str, hint: str) -> Path:
    given = Path(value).expanduser()
    path = given if given.is_absolute() else base / given
    if not path.exists():
        origin = "" if given.is_absolute() else f" (resolved from '{value}' relative to {base})"
        raise FileNotFoundError(f"{field}: no such file or folder '{path}'{origin}; {hint}")
    return path


def _require_labels(cfg: DataConfig, has_labels: bool, name: str, hint: str = "") -> None:
    if cfg.class_conditional and not has_labels:
        raise ValueError(
            f"data.class_conditional is true but the source '{name}' has no labels{hint}; "
            "give a labelled source or set data.class_conditional: false"
        )


def _source_kind(path: Path) -> Literal["folder", "npz", "prompts", "idx"]:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".txt", ".json"):
        return "prompts"
    magic = _idx_magic(path)
    if magic == _IDX_IMAGES_MAGIC:
        return "idx"
    if magic == _IDX_LABELS_MAGIC:
        raise ValueError(
            f"data.source: '{path}' is an idx labels file; give the images file as data.source "
            "and this one as data.labels"
        )
    raise ValueError(
        f"data.source: cannot tell what '{path}' holds (not a folder, .npz, .txt, .json or idx file); {_SOURCE_HINT}"
    )


def _open_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _idx_magic(path: Path) -> int | None:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
        head = f.read(4)
    return int.from_bytes(head, "big") if len(head) == 4 else None


def _read_idx(path: Path, magic: int, field: str) -> np.ndarray:
    """An idx file (MNIST format, plain or gzip): big-endian magic, one uint32 per dimension, uint8 data."""
    data = _open_maybe_gzip(path)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        what = "images (N, H, W) uint8" if magic == _IDX_IMAGES_MAGIC else "labels (N,) uint8"
        raise ValueError(
            f"{field}: '{path}' is not an idx {what} file: magic number {shown}, expected 0x{magic:08x}; "
            "give an MNIST-format file such as train-images-idx3-ubyte.gz"
        )
    ndim = magic & 0xFF
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(
            f"{field}: '{path}' declares shape {dims} ({expected} bytes) but holds {len(data) - offset} bytes "
            "of data; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_labels(cfg: DataConfig, images_path: Path, base: Path, n: int) -> np.ndarray | None:
    if cfg.labels is not None:
        path = _resolve(
            cfg.labels, base, "data.labels", "give the idx(.gz) labels file that pairs with data.source"
        )
    else:
        sibling = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
        if sibling == images_path or not sibling.exists():
            expected = f" (looked for '{sibling}')" if sibling != images_path else ""
            _require_labels(
                cfg, False, images_path.name, f"{expected}; set data.labels to the idx labels file"
            )
            return None
        path = sibling
    labels = _read_idx(path, _IDX_LABELS_MAGIC, "data.labels").astype(np.int64)
    if len(labels) != n:
        raise ValueError(
            f"data.labels: '{path}' holds {len(labels)} labels but data.source holds {n} images; pair matching files"
        )
    return labels


def _read_npz(
    path: Path, images_key: str | None, labels_key: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.files)

        def pick(override: str | None, candidates: tuple[str, ...], field: str) -> str | None:
            if override is not None:
                if override not in keys:
                    raise KeyError(f"{field}: '{override}' is not in '{path}'; available keys: {keys}")
                return override
            return next((k for k in candidates if k in keys), None)

        ikey = pick(images_key, _NPZ_IMAGE_KEYS, "data.images_key")
        if ikey is None:
            raise KeyError(
                f"data.source: '{path}' has none of the image keys {list(_NPZ_IMAGE_KEYS)}; "
                f"available keys: {keys}; set data.images_key"
            )
        lkey = pick(labels_key, _NPZ_LABEL_KEYS, "data.labels_key")
        images = npz[ikey]
        labels = npz[lkey] if lkey is not None else None
    return _to_nchw(images, f"{path}['{ikey}']"), labels


def _to_nchw(a: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, C, H, W) kept; (N, H, W, C) -> (N, C, H, W), for C in {1, 3}."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4 and a.shape[1] in (1, 3):
        return a
    if a.ndim == 4 and a.shape[3] in (1, 3):
        return a.transpose(0, 3, 1, 2)
    raise ValueError(
        f"data.source: {where} has shape {a.shape}; expected images (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3"
    )


def _full_scale(images: np.ndarray, where: str) -> float:
    """The value that maps to +1: 255 for integer pixels in 0..255, 1 for floats in [0, 1]."""
    if len(images) == 0:
        raise ValueError(f"data.source: '{where}' holds no images; give a non-empty source")
    lo, hi = float(images.min()), float(images.max())
    if np.issubdtype(images.dtype, np.integer) and lo >= 0 and hi <= 255:
        return 255.0
    if np.issubdtype(images.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return 1.0
    raise ValueError(
        f"data.source: images in '{where}' are {images.dtype} with values in [{lo}, {hi}]; expected integers in "
        "0..255 or floats in [0, 1] (for [-1, 1] data store x * 0.5 + 0.5)"
    )


def _check_labels(labels: np.ndarray, n: int, where: str) -> int:
    """Validate (N,) non-negative integer labels; returns the number of classes, max + 1."""
    if (
        labels.ndim != 1
        or len(labels) != n
        or not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
    ):
        raise ValueError(
            f"data: labels of '{where}' must be (N,) = ({n},) non-negative integers, got shape {labels.shape} "
            f"dtype {labels.dtype}; fix the labels array or set data.labels_key"
        )
    return int(labels.max()) + 1


def read_prompts(path: Path, field: str) -> tuple[str, ...]:
    if path.suffix.lower() == ".json":
        prompts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f'{field}: \'{path}\' must hold a JSON list of strings, e.g. ["a cat", "a dog"]')
    elif path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(
            f"{field}: '{path}' is not a prompt list; give a .txt (one prompt per line) or .json list"
        )
    if not prompts:
        raise ValueError(f"{field}: '{path}' holds no prompts; give at least one")
    return tuple(prompts)


def _paired_prompts(cfg: DataConfig, base: Path, n: int) -> tuple[str, ...] | None:
    if cfg.prompts is None:
        return None
    path = _resolve(
        cfg.prompts, base, "data.prompts", "give a .txt or .json prompt list, one prompt per source image"
    )
    prompts = read_prompts(path, "data.prompts")
    if len(prompts) != n:
        raise ValueError(
            f"data.prompts: '{path}' holds {len(prompts)} prompts but data.source holds {n} images; "
            "give exactly one prompt per image, in the source's order"
        )
    return prompts


def _folder_dataset(cfg: DataConfig, root: Path, base: Path) -> Dataset:
    """Images directly in ``root`` (unlabelled) or in one level of class subfolders (labels by sorted name)."""
    from PIL import Image

    def images_in(folder: Path) -> list[Path]:
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    files = images_in(root)
    subfolders = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and images_in(p)
    )
    if files and subfolders:
        raise ValueError(
            f"data.source: '{root}' holds images both directly and in subfolders {[p.name for p in subfolders]}; "
            "put all images in class subfolders, or all directly in the folder"
        )
    class_names = [p.name for p in subfolders] or None
    labels_list: list[int] = []
    for k, sub in enumerate(subfolders):
        found = images_in(sub)
        files += found
        labels_list += [k] * len(found)
    if not files:
        raise ValueError(
            f"data.source: '{root}' holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}); give a folder of images"
        )
    prompts = _paired_prompts(cfg, base, len(files))
    if cfg.limit is not None:
        files, labels_list = files[: cfg.limit], labels_list[: cfg.limit]
        prompts = prompts[: cfg.limit] if prompts is not None else None
    _require_labels(cfg, class_names is not None, root.name, " (its images are not in class subfolders)")

    arrays = []
    for f in files:
        with Image.open(f) as im:
            gray = im.mode in ("1", "L", "LA")
            a = np.asarray(im.convert("L" if gray else "RGB"))
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    if cfg.resolution is None and len({a.shape[1:] for a in arrays}) > 1:
        sizes = {a.shape[1:]: f for a, f in zip(arrays, files)}
        raise ValueError(
            f"data.source: images in '{root}' differ in size ({', '.join(f'{h}x{w} e.g. {p.name}' for (h, w), p in list(sizes.items())[:3])}); "
            "set data.resolution to resize them all to one square size"
        )
    channels = cfg.channels or (3 if any(a.shape[0] == 3 for a in arrays) else 1)
    x = torch.cat([_to_model_space(a[None], 255.0, channels, cfg.resolution) for a in arrays])
    return Dataset(
        root.name,
        x,
        torch.tensor(labels_list, dtype=torch.int64) if class_names is not None else None,
        prompts,
        num_classes=len(class_names) if class_names is not None else None,
        class_names=class_names,
        class_conditional=cfg.class_conditional,
        flip=cfg.flip,
    )


def _to_model_space(
    raw: np.ndarray, full_scale: float, channels: int | None, resolution: int | None
) -> Tensor:
    """raw: (N, C, H, W) with values in [0, full_scale] -> (N, C', R, R) float32 in [-1, 1], in chunks."""
    out: Tensor | None = None
    for lo in range(0, len(raw), _CHUNK):
        x = torch.from_numpy(np.array(raw[lo : lo + _CHUNK], dtype=np.float32)) / (full_scale / 2) - 1
        x = _convert(x, channels, resolution)
        if out is None:
            out = torch.empty((len(raw), *x.shape[1:]), dtype=torch.float32)
        out[lo : lo + len(x)] = x
    assert out is not None
    return out


def _convert(x: Tensor, channels: int | None, resolution: int | None) -> Tensor:
    """x: (B, C, H, W) in [-1, 1] -> channel-converted, centre-cropped and resized (B, C', R, R)."""
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)  # ITU-R BT.601 luma
        x = (x * weights).sum(1, keepdim=True)
    if resolution is None or x.shape[-2:] == (resolution, resolution):
        return x
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0)  # guards against rounding just outside the range


def _load_cache(path: Path, fingerprint: str, n: int) -> Tensor | None:
    """The cached latents when ``path`` was written for this fingerprint and set size, else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint or "latents" not in f.keys():
            return None
        latents = f.get_tensor("latents")
    return latents if latents.shape[0] == n else None


def _write_cache(path: Path, latents: Tensor, fingerprint: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"latents": latents}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half-written cache behind


# ------------------------------------------------------------------------------------------------
# Sources read per batch (metadata folders, datasets, webdataset shards), batches and the stream


@dataclass(frozen=True)
class Samples:
    """One process's slice of a global micro-batch, on the CPU, before conditioning is encoded.

    x: (B, C, H, W) float32 images in [-1, 1], or latents in the teacher's scale when ``latent``; None for a
        prompt-only source. Within a batch every sample has the same H, W (one aspect-ratio bucket).
    labels: (B,) int64 or None (None unless class-conditional). prompts: B captions after caption dropout
        (a dropped caption is ""), or None when the source has none. negatives: B negative prompts or None.
    size_cond: (B, 6) float32 (original height, original width, crop top, crop left, target height, target
        width) in pixels, SDXL's ``add_time_ids`` order (Podell et al. 2023, §2.2), for sources read per batch;
        None for in-memory sources. Crop coordinates are in the resized image, as in SDXL's training.
    text / negative_text: the cached text-encoder outputs for ``prompts`` / ``negatives`` (Cond with the cached
        fields, caption dropout already applied), or None when the prompts must be encoded live.
    """

    x: Tensor | None
    labels: Tensor | None = None
    prompts: tuple[str, ...] | None = None
    negatives: tuple[str, ...] | None = None
    size_cond: Tensor | None = None
    latent: bool = False
    text: Cond | None = None
    negative_text: Cond | None = None


def source_kind(cfg: DataConfig, base: Path | None = None) -> str:
    """What ``cfg.source`` is: digits, prompts, folder, npz, idx (read into memory) or metadata, datasets,
    shards (read per batch). See the table in README.md."""
    from fewstep.sources import is_hf_dataset, is_metadata_folder, is_shard_pattern

    if cfg.source == "digits":
        return "digits"
    base = Path.cwd() if base is None else Path(base)
    if is_shard_pattern(cfg.source):
        return "shards"
    path = _resolve(cfg.source, base, "data.source", _SOURCE_HINT)
    if is_metadata_folder(path):
        return "metadata"
    if is_hf_dataset(path):
        return "datasets"
    return _source_kind(path)


PER_BATCH_KINDS = ("metadata", "datasets", "shards")


def open_source(cfg: DataConfig, base: Path | None = None, cache_root: Path | None = None) -> Any:
    """The source object of a per-batch kind (:mod:`fewstep.sources`); ``cache_root`` holds parquet
    conversions and shard sample counts."""
    from fewstep.sources import HFSource, MetadataFolderSource, ShardSource

    base = Path.cwd() if base is None else Path(base)
    kind = source_kind(cfg, base)
    reject_unused(cfg, kind=f"a {kind} source", fields=("labels", "images_key", "labels_key", "prompts"))
    if kind == "shards":
        given = Path(cfg.source).expanduser()
        return ShardSource(str(given if given.is_absolute() else base / given), cfg, cache_root)
    path = _resolve(cfg.source, base, "data.source", _SOURCE_HINT)
    if kind == "metadata":
        return MetadataFolderSource(path, cfg)
    if kind == "datasets":
        return HFSource(path, cfg, cache_root / "datasets" if cache_root is not None else None)
    raise ValueError(f"data.source '{cfg.source}' is a {kind} source, read into memory by build_dataset")


def load_image(record: Any, size: tuple[int, int], channels: int, *, crop_u: tuple[float, float] | None = None,
               flip: bool = False) -> tuple[Tensor, Tensor]:
    """Decode, resize and crop one image.

    The image (H, W) is resized (bilinear, antialiased) by the smallest factor that covers ``size`` = (h, w),
    then an h x w window is cut: centred, or at fractions ``crop_u`` in [0, 1) of the free range (random
    crops). Returns x: (channels, h, w) float32 in [-1, 1] and size_cond: (6,) (H, W, top, left, h, w).
    """
    h, w = size
    with record.open() as im:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    x = torch.from_numpy(np.array(a, dtype=np.float32)) / 127.5 - 1
    x = x[None] if channels == 1 else x.permute(2, 0, 1)
    H, W = x.shape[-2:]
    scale = max(h / H, w / W)
    rh, rw = max(h, round(H * scale)), max(w, round(W * scale))
    if (rh, rw) != (H, W):
        x = F.interpolate(x[None], size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
    if crop_u is None:
        top, left = (rh - h) // 2, (rw - w) // 2
    else:
        top, left = min(int(crop_u[0] * (rh - h + 1)), rh - h), min(int(crop_u[1] * (rw - w + 1)), rw - w)
    x = x[:, top : top + h, left : left + w]
    if flip:
        x = x.flip(-1)
    return x.clamp(-1.0, 1.0), torch.tensor([H, W, top, left, h, w], dtype=torch.float32)


def nearest_buckets(sizes: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """sizes: (N, 2) (height, width) -> (N,) int64 index of the bucket of nearest aspect ratio (in log ratio)."""
    ratios = np.log(sizes[:, 0] / sizes[:, 1])[:, None]
    targets = np.log(np.array([h / w for h, w in buckets]))[None]
    return np.abs(ratios - targets).argmin(1).astype(np.int64)


class RecordDataset:
    """A per-batch source (:func:`open_source`) behind the :class:`Dataset` interface: nothing but the source's
    small index is in memory; images are decoded when a batch is gathered.

    size: (height, width) of square data.resolution, or None with buckets (each sample's bucket size).
    """

    def __init__(self, source: Any, cfg: DataConfig, kind: str) -> None:
        self.source, self.cfg, self.kind = source, cfg, kind
        self.name = source.name
        self.indexable = kind != "shards"
        has_captions = getattr(source, "has_captions", None)
        self.has_captions = has_captions if has_captions is not None else source.captions is not None
        has_labels = getattr(source, "has_labels", None)
        self.has_labels = has_labels if has_labels is not None else source.labels is not None
        self.num_classes = source.num_classes if source.num_classes is not None else cfg.num_classes
        self.class_conditional = cfg.class_conditional
        self.flip = cfg.flip
        image_field = {"metadata": "root", "datasets": "image_column", "shards": "image_key"}[kind]
        self.has_images = getattr(source, image_field) is not None
        _require_labels(cfg, self.has_labels, self.name)
        if cfg.class_conditional and self.num_classes is None:
            raise ValueError(f"data.class_conditional: the labels of the shards '{self.name}' are not scanned; "
                             "set data.num_classes")
        self.channels = cfg.channels or 3
        self.buckets = [tuple(b) for b in cfg.buckets] if cfg.buckets else None
        if self.buckets is not None and not self.indexable:
            raise ValueError("data.buckets needs random access to group images by aspect ratio; webdataset shards "
                             "are a stream: use a metadata folder or a datasets source, or drop data.buckets")
        if self.buckets is None and cfg.resolution is None and self.has_images:
            raise ValueError(f"data.resolution is not set for '{self.name}'; images read per batch are resized to "
                             "it (the trainer sets it from the teacher)")
        res = cfg.resolution
        self.shape: tuple[int, int, int] | None = (self.channels, res, res) if res and self.has_images else None
        self._bucket_of: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    def bucket_of(self) -> np.ndarray:
        """(N,) bucket index of every sample (image headers are read once, on first use)."""
        assert self.buckets is not None
        if self._bucket_of is None:
            sizes = []
            for lo in range(0, len(self), 1024):
                for r in self.source.records(range(lo, min(lo + 1024, len(self)))):
                    with r.open() as im:
                        sizes.append((im.height, im.width))
            self._bucket_of = nearest_buckets(np.asarray(sizes, dtype=np.float64), self.buckets)
        return self._bucket_of

    def size_of(self, bucket: int) -> tuple[int, int]:
        if self.buckets is not None:
            return self.buckets[bucket]
        assert self.cfg.resolution is not None
        return (self.cfg.resolution, self.cfg.resolution)

    def gather(self, records: list[Any], bucket: int = 0, *, flip: Tensor | None = None,
               crop_u: Tensor | None = None, dropped: Tensor | None = None) -> Samples:
        """Decode and preprocess ``records`` into one batch (see :class:`Samples`)."""
        x = size_cond = None
        if self.has_images:
            size = self.size_of(bucket)
            outs = [load_image(r, size, self.channels, crop_u=tuple(crop_u[j].tolist()) if crop_u is not None
                               else None, flip=bool(flip[j]) if flip is not None else False)
                    for j, r in enumerate(records)]
            x = torch.stack([o[0] for o in outs])
            size_cond = torch.stack([o[1] for o in outs])
        labels = None
        if self.class_conditional:
            labels = torch.tensor([r.label for r in records], dtype=torch.int64)
        prompts = None
        if self.has_captions:
            prompts = tuple("" if dropped is not None and dropped[j] else (r.caption or "")
                            for j, r in enumerate(records))
        negatives = tuple(r.negative or "" for r in records) if records and records[0].negative is not None else None
        return Samples(x=x, labels=labels, prompts=prompts, negatives=negatives, size_cond=size_cond)

    def get(self, idx: Tensor, flip: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, tuple[str, ...] | None]:
        """The :class:`Dataset` interface: centre crops of samples ``idx`` (first bucket's size with buckets)."""
        records = self.source.records(idx.tolist())
        buckets = self.bucket_of()[idx.numpy()] if self.buckets is not None else None
        if buckets is not None and len(set(buckets.tolist())) > 1:  # one tensor needs one size: use the first
            buckets = np.zeros_like(buckets)
        s = self.gather(records, int(buckets[0]) if buckets is not None else 0, flip=flip)
        return s.x, s.labels, s.prompts

    def describe(self) -> str:
        text = f"{self.name}: {len(self)} {self.kind} samples"
        if self.buckets is not None:
            text += f", buckets {', '.join(f'{h}x{w}' for h, w in self.buckets)}"
        elif self.shape is not None:
            text += f" -> {'x'.join(map(str, self.shape))}"
        if self.num_classes is not None:
            text += f", {self.num_classes} classes"
        if self.has_captions:
            text += ", with captions"
        return text


class BucketStream:
    """Global micro-batches of one aspect-ratio bucket each, a pure function of (seed, position).

    Epoch e: the permutation of all samples seeded by (seed, e) (the same as :class:`IndexStream`'s) is split
    by bucket, keeping its order; each bucket is cut into groups of ``group`` samples (the remainder of each
    bucket is left out of that epoch); the groups are shuffled by (seed, e). An epoch holds M = group x
    (number of groups) positions; position p is in epoch p // M, group (p % M) // group. Reads must start
    at a multiple of ``group`` (the trainer's micro-batches do).
    """

    def __init__(self, bucket_of: np.ndarray, seed: int, group: int) -> None:
        counts = np.bincount(bucket_of)
        self.groups_per_epoch = int((counts // group).sum())
        if self.groups_per_epoch == 0:
            raise ValueError(f"data.buckets: no bucket holds a full global micro-batch of {group} samples (bucket "
                             f"sizes {counts.tolist()}); use fewer buckets or a smaller batch")
        self.bucket_of, self.seed, self.group = bucket_of, seed, group
        self.n = len(bucket_of)
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def _groups(self, epoch: int) -> list[np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = _permutation(self.n, self.seed, epoch).numpy()
            groups = []
            for b in range(int(self.bucket_of.max()) + 1):
                members = perm[self.bucket_of[perm] == b]
                usable = len(members) // self.group * self.group
                groups += list(members[:usable].reshape(-1, self.group))
            rng = np.random.Generator(np.random.PCG64(_mix_seed(self.seed, epoch, 5)))
            self._epoch = (epoch, [groups[i] for i in rng.permutation(len(groups))])
        return self._epoch[1]

    def batch(self, start: int, count: int) -> tuple[Tensor, int]:
        """(count,) indices of the group at position ``start`` and its bucket; count must equal ``group``."""
        if start % self.group or count != self.group:
            raise ValueError(f"BucketStream: reads must be whole groups of {self.group} at multiples of it, "
                             f"got start={start}, count={count}")
        epoch, k = divmod(start // self.group, self.groups_per_epoch)
        idx = self._groups(epoch)[k]
        return torch.from_numpy(idx.copy()), int(self.bucket_of[idx[0]])


def uniform_draws(seed: int, tag: int, start: int, count: int, width: int = 1) -> Tensor:
    """(count, width) uniforms in [0, 1) at stream positions [start, start + count), a pure function of (seed,
    tag, position): drawn per block of 4096 positions like :meth:`IndexStream.flips`."""
    _check_span(start, count)
    block_size = IndexStream._FLIP_BLOCK
    parts, pos, end = [], start, start + count
    while pos < end:
        block, offset = divmod(pos, block_size)
        take = min(block_size - offset, end - pos)
        gen = torch.Generator().manual_seed(_mix_seed(seed, block, tag))
        parts.append(torch.rand(block_size, width, generator=gen)[offset : offset + take])
        pos += take
    return torch.cat(parts) if parts else torch.empty(0, width)


class DataStream:
    """What the trainer reads: this process's slice of the global micro-batch at a stream position.

    dataset: an in-memory :class:`Dataset` / :class:`LatentDataset`, a :class:`RecordDataset` or a
    :class:`fewstep.cache.CachedDataset`. Order: webdataset shards follow :class:`fewstep.sources.ShardStream`;
    with buckets, :class:`BucketStream`; otherwise :class:`IndexStream`. Flips, random-crop offsets and caption
    dropout are drawn per stream position from (seed, position), so every draw is a pure function of (seed,
    images seen): a resumed run replays exactly and ranks together see the same global batch as one process.
    """

    _TAG_DROP, _TAG_CROP = 3, 4

    def __init__(self, dataset: Any, cfg: DataConfig, seed: int, group: int) -> None:
        self.dataset, self.cfg, self.seed, self.group = dataset, cfg, seed, group
        self.shards = None
        self.buckets = None
        self.index = IndexStream(len(dataset), seed)
        if isinstance(dataset, RecordDataset) and not dataset.indexable:
            from fewstep.sources import ShardStream

            self.shards = ShardStream(dataset.source, seed)
        elif getattr(dataset, "buckets", None) is not None:
            self.buckets = BucketStream(dataset.bucket_of(), seed, group)
        if cfg.crop == "random" and not isinstance(dataset, RecordDataset):
            raise ValueError(f"data.crop: random crops apply to images decoded per batch; '{dataset.name}' is "
                             "in memory or cached (set data.crop: center, or data.cache: off)")

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, start: int, count: int, lo: int, n: int) -> Samples:
        """Positions [start, start + count) form the global micro-batch; this process gets rows [lo, lo + n)."""
        keep = slice(lo, lo + n)
        cfg, ds = self.cfg, self.dataset
        flip = self.index.flips(start, count)[keep] if cfg.flip else None
        dropped = None
        if cfg.caption_dropout > 0:
            dropped = uniform_draws(self.seed, self._TAG_DROP, start, count)[keep, 0] < cfg.caption_dropout
        if isinstance(ds, RecordDataset):
            crop_u = uniform_draws(self.seed, self._TAG_CROP, start, count, 2)[keep] if cfg.crop == "random" else None
            if self.shards is not None:
                return ds.gather(self.shards.read(start, count, keep), flip=flip, crop_u=crop_u, dropped=dropped)
            idx, bucket = self._indices(start, count)
            return ds.gather(ds.source.records(idx[keep].tolist()), bucket, flip=flip, crop_u=crop_u,
                             dropped=dropped)
        idx, bucket = self._indices(start, count)
        if hasattr(ds, "fetch"):  # a cache
            return ds.fetch(idx[keep], bucket, flip=flip, dropped=dropped)
        x, labels, prompts = ds.get(idx[keep], flip)
        if prompts is not None and dropped is not None:
            prompts = tuple("" if d else p for p, d in zip(prompts, dropped.tolist()))
        return Samples(x=x, labels=labels, prompts=prompts, latent=isinstance(ds, LatentDataset))

    def _indices(self, start: int, count: int) -> tuple[Tensor, int]:
        if self.buckets is not None:
            return self.buckets.batch(start, count)
        return self.index.indices(start, count), 0


def build_data(cfg: DataConfig, base: Path | None = None, cache_root: Path | None = None) -> Dataset | RecordDataset:
    """An in-memory :class:`Dataset` (digits, folders without metadata, npz, idx, prompt lists) or a
    :class:`RecordDataset` (metadata folders, datasets, webdataset shards) for ``cfg.source``."""
    kind = source_kind(cfg, base)
    if kind in PER_BATCH_KINDS:
        return RecordDataset(open_source(cfg, base, cache_root), cfg, kind)
    check_in_memory_options(cfg, kind)
    return build_dataset(cfg, base)
