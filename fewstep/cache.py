"""On-disk caches of VAE latents and text-encoder outputs for sources read per batch (DESIGN.md §9).

A cache folder holds, for every sample of the source in its canonical order (metadata rows, dataset rows,
shards as listed then stored order), the latent of its centre crop (one ``.npy`` per aspect-ratio bucket),
the text encoder's outputs for its caption and negative prompt (one ``.npy`` per Cond field), its label and
its caption, all memory-mapped when training reads them. ``meta.json`` records the fingerprint the cache
was built for: the encoders' weights (a digest of every tensor), the preprocessing (resolution, buckets,
channels, columns, limit), the source (path and size) and the storage dtype.

- Atomic: a cache is built in ``FOLDER.partial`` and renamed to ``FOLDER`` when complete, so ``FOLDER``
  either does not exist or is whole.
- Resumable: the build writes ``progress.json`` (samples done, written after their rows are flushed);
  an interrupted build with the same fingerprint continues from there.
- Stale caches are refused: opening ``FOLDER`` built for another fingerprint raises :class:`StaleCacheError`
  naming what changed. A stale ``.partial`` is simply rebuilt (it holds nothing finished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.data import RecordDataset, Samples, load_image
from fewstep.sources import Strings
from fewstep.types import Cond

__all__ = ["CachedDataset", "StaleCacheError", "build_cache", "cache_folder", "fingerprint", "open_cache",
           "prepare_cache", "weights_digest"]

_FORMAT = 2  # bump when the folder layout changes (2: captions as captions.bin + captions_ends.npy)


class StaleCacheError(ValueError):
    """A cache folder was built for other encoders, preprocessing or source than the run's."""


def weights_digest(module: nn.Module | None) -> str | None:
    """SHA-256 of a module's class, parameter/buffer names, shapes, dtypes and values (None for no module)."""
    if module is None:
        return None
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(dataset: RecordDataset, teacher: Any, dtype: str) -> dict[str, Any]:
    """What a cache depends on. ``teacher`` needs ``vae``, ``vae_scale``, ``vae_shift``, ``text_encoder``,
    ``tokenizer`` and ``conditioning`` (a :class:`fewstep.teacher.Teacher`)."""
    cfg = dataset.cfg
    text = teacher.conditioning == "text" and dataset.has_captions
    tokenizer = getattr(teacher, "tokenizer", None)
    return {
        "format": _FORMAT,
        "source": {"path": str(cfg.source), "kind": dataset.kind, "samples": len(dataset)},
        "preprocess": {"resolution": cfg.resolution, "buckets": dataset.buckets, "channels": dataset.channels,
                       "crop": "center", "limit": cfg.limit, "caption_column": cfg.caption_column,
                       "label_column": cfg.label_column, "negative_column": cfg.negative_column,
                       "image_column": cfg.image_column, "split": cfg.split},
        "vae": {"weights": weights_digest(teacher.vae), "scale": teacher.vae_scale, "shift": teacher.vae_shift}
        if dataset.has_images else None,
        "text_encoder": {"weights": weights_digest(teacher.text_encoder),
                         "max_length": getattr(tokenizer, "model_max_length", None),
                         "vocab": len(tokenizer) if tokenizer is not None else None} if text else None,
        "dtype": dtype,
    }


def cache_folder(dataset: RecordDataset, root: Path) -> Path:
    """Default folder of a source's cache under ``root``: named by the source and its preprocessing, not by the
    encoders, so that a changed encoder meets its old cache and is refused rather than silently re-encoded."""
    cfg = dataset.cfg
    key = json.dumps([str(cfg.source), cfg.resolution, dataset.buckets, dataset.channels, cfg.limit], default=str)
    return root / "data" / f"{dataset.name.replace('{', '').replace('}', '')[:40]}-" \
                           f"{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    if old != new:
        return [f"{prefix}: cache has {_short(old)!r}, the run has {_short(new)!r}"]
    return []


def _short(value: Any) -> Any:
    return value[:12] + "..." if isinstance(value, str) and len(value) > 40 else value  # weight digests


def _check(folder: Path, fp: dict[str, Any]) -> dict[str, Any]:
    meta = json.loads((folder / "meta.json").read_text())
    changes = _diff(json.loads(json.dumps(meta.get("fingerprint"))), json.loads(json.dumps(fp)))
    if changes:
        raise StaleCacheError(
            f"the data cache {folder} was built for other inputs ({'; '.join(changes)}); it is stale. Delete "
            f"the folder (or set data.cache to another folder) and run `fewstep cache RECIPE` or the training "
            "again to rebuild it")
    return meta


def open_cache(folder: Path, fp: dict[str, Any], base: RecordDataset) -> CachedDataset | None:
    """The complete cache in ``folder`` (None if there is none); raises :class:`StaleCacheError` if it was
    built for another fingerprint."""
    if not (folder / "meta.json").is_file():
        return None
    return CachedDataset(folder, _check(folder, fp), base)


def _records_from(dataset: RecordDataset, start: int, chunk: int) -> Iterator[list[Any]]:
    """Records in canonical order from ``start``, in lists of ``chunk``."""
    n = len(dataset)
    if dataset.indexable:
        for lo in range(start, n, chunk):
            yield dataset.source.records(range(lo, min(lo + chunk, n)))
        return
    batch: list[Any] = []
    for k, record in enumerate(dataset.source.iter_records()):
        if k < start:
            continue  # resuming a webdataset build: read, not decoded
        batch.append(record)
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def build_cache(folder: Path, dataset: RecordDataset, fp: dict[str, Any], *,
                encode_images: Callable[[Tensor], Tensor] | None,
                encode_text: Callable[[list[str]], Cond] | None, batch_size: int = 64,
                progress: Callable[[int, int], None] | None = None) -> CachedDataset:
    """Encode every sample of ``dataset`` into ``folder`` (see the module docstring); returns the opened cache.

    encode_images: (B, C, H, W) in [-1, 1] -> (B, c, h, w) latents (None: the source's images are not cached).
    encode_text: prompts -> Cond (None: captions are kept as text only). progress(done, total) after each chunk.
    """
    if (folder / "meta.json").is_file():
        return CachedDataset(folder, _check(folder, fp), dataset)
    n = len(dataset)
    partial = folder.with_name(folder.name + ".partial")
    state = partial / "progress.json"
    if partial.is_dir() and (not state.is_file() or json.loads(state.read_text()).get("fingerprint") != fp):
        shutil.rmtree(partial)  # another build's unfinished work: nothing in it can be reused
    resuming = state.is_file()
    partial.mkdir(parents=True, exist_ok=True)
    done = json.loads(state.read_text())["done"] if resuming else 0
    bucket_of = dataset.bucket_of() if dataset.buckets is not None else np.zeros(n, dtype=np.int64)
    row_of = np.zeros(n, dtype=np.int64)
    for b in np.unique(bucket_of):
        members = np.nonzero(bucket_of == b)[0]
        row_of[members] = np.arange(len(members))
    if not resuming:
        np.save(partial / "bucket_of.npy", bucket_of)
        np.save(partial / "row_of.npy", row_of)
    out = _Arrays(partial, n, np.dtype(fp["dtype"]))
    if encode_text is not None and not (partial / "null.json").is_file():
        null = encode_text([""])
        for field, t in _fields(null).items():
            np.save(partial / f"null_{field}.npy", _stored(t, out.dtype))
        (partial / "null.json").write_text(json.dumps(sorted(_fields(null))))
    captions = None
    if dataset.has_captions:  # appended per chunk, end offsets in a memory-mapped array like the rest
        ends = out.get("captions_ends", (), np.int64)
        with open(partial / "captions.bin", "ab") as f:
            f.truncate(int(ends[done - 1]) if done else 0)  # drop the bytes of a chunk that was not completed
        captions = open(partial / "captions.bin", "ab")  # noqa: SIM115 (closed in the finally below)
    i = done
    try:
        with torch.no_grad():
            for records in _records_from(dataset, done, batch_size):
                rows = np.arange(i, i + len(records))
                if encode_images is not None and dataset.has_images:
                    for b in np.unique(bucket_of[rows]):
                        sel = np.nonzero(bucket_of[rows] == b)[0]
                        size = dataset.size_of(int(b))
                        x = torch.stack([load_image(records[j], size, dataset.channels)[0] for j in sel])
                        z = encode_images(x).float().cpu().numpy()
                        latents = out.get(f"latents_{b}", z.shape[1:], out.dtype, rows=int((bucket_of == b).sum()))
                        latents[row_of[rows[sel]]] = z.astype(out.dtype)
                        out.get("size_cond", (6,), np.float32)[rows[sel]] = _size_conds(records, sel, dataset, int(b))
                if dataset.has_labels:
                    out.get("labels", (), np.int64)[rows] = [r.label for r in records]
                if captions is not None:
                    encoded = [(r.caption or "").encode("utf-8") for r in records]
                    ends = out.get("captions_ends", (), np.int64)
                    ends[rows] = (int(ends[i - 1]) if i else 0) + np.cumsum([len(e) for e in encoded])
                    captions.write(b"".join(encoded))
                    captions.flush()
                    if encode_text is not None:
                        for field, t in _fields(encode_text([r.caption or "" for r in records])).items():
                            out.get(f"text_{field}", t.shape[1:], _kind(t, out.dtype))[rows] = _stored(t, out.dtype)
                if records[0].negative is not None and encode_text is not None:
                    for field, t in _fields(encode_text([r.negative or "" for r in records])).items():
                        out.get(f"negative_{field}", t.shape[1:], _kind(t, out.dtype))[rows] = _stored(t, out.dtype)
                out.flush()
                i += len(records)
                _atomic_write(state, json.dumps({"fingerprint": fp, "done": i}))  # after the rows are on disk
                if progress is not None:
                    progress(i, n)
    finally:
        if captions is not None:
            captions.close()
    if i != n:
        raise RuntimeError(f"data cache: the source yielded {i} samples, {n} expected; is it changing on disk?")
    out.close()
    state.unlink()
    _atomic_write(partial / "meta.json", json.dumps({"fingerprint": fp, "samples": n,
                                                      "buckets": dataset.buckets}, indent=1))
    partial.rename(folder)  # atomic: the folder appears complete or not at all
    return CachedDataset(folder, _check(folder, fp), dataset)


class _Arrays:
    """The memory-mapped .npy files of a cache being built, created on first use (N rows, or ``rows``)."""

    def __init__(self, folder: Path, n: int, dtype: np.dtype) -> None:
        self.folder, self.n, self.dtype = folder, n, dtype
        self.open: dict[str, np.memmap] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any, rows: int | None = None) -> np.memmap:
        if name not in self.open:
            path = self.folder / f"{name}.npy"
            self.open[name] = (np.load(path, mmap_mode="r+") if path.is_file() else np.lib.format.open_memmap(
                path, mode="w+", dtype=np.dtype(dtype), shape=(self.n if rows is None else rows, *shape)))
        return self.open[name]

    def flush(self) -> None:
        for a in self.open.values():
            a.flush()

    def close(self) -> None:
        self.flush()
        self.open.clear()


def _size_conds(records: list[Any], sel: np.ndarray, dataset: RecordDataset, bucket: int) -> np.ndarray:
    """(len(sel), 6) SDXL size conditioning of centre crops, from the image headers alone."""
    h, w = dataset.size_of(int(bucket))
    out = []
    for j in sel:
        with records[j].open() as im:
            H, W = im.height, im.width
        scale = max(h / H, w / W)
        rh, rw = max(h, round(H * scale)), max(w, round(W * scale))
        out.append([H, W, (rh - h) // 2, (rw - w) // 2, h, w])
    return np.asarray(out, dtype=np.float32)


def _kind(t: Tensor, dtype: np.dtype) -> np.dtype:
    """Storage type of a Cond field: the cache dtype for floating fields, int64 for masks and ids."""
    return dtype if t.is_floating_point() else np.dtype(np.int64)


def _stored(t: Tensor, dtype: np.dtype) -> np.ndarray:
    return t.detach().cpu().float().numpy().astype(dtype) if t.is_floating_point() else t.detach().cpu().long().numpy()


def _loaded(a: np.ndarray) -> Tensor:
    """Rows read back: floating fields as float32 (the trainer casts to the compute dtype), integers as int64."""
    a = np.asarray(a)
    return torch.from_numpy(a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64))


def _fields(cond: Cond) -> dict[str, Tensor]:
    return {f.name: v for f in dataclasses.fields(cond) if isinstance(v := getattr(cond, f.name), Tensor)}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class CachedDataset:
    """A complete cache folder, memory-mapped; the :class:`Dataset` interface over latents (``get``) plus
    :meth:`fetch` for the trainer's stream. ``base`` is the source's :class:`RecordDataset` (pixels, for
    evaluation against the training images)."""

    def __init__(self, folder: Path, meta: dict[str, Any], base: RecordDataset) -> None:
        self.folder, self.meta, self.base = folder, meta, base
        self.name = base.name
        self.n = int(meta["samples"])
        self.buckets = base.buckets
        self.bucket_of_array = np.load(folder / "bucket_of.npy")
        self.row_of = np.load(folder / "row_of.npy")
        self.latents = {int(p.stem.split("_")[1]): np.load(p, mmap_mode="r") for p in folder.glob("latents_*.npy")}
        self.has_images = bool(self.latents)
        self.shape = tuple(self.latents[0].shape[1:]) if 0 in self.latents and self.buckets is None else None
        self.data_shape = base.shape
        self.size_cond = np.load(folder / "size_cond.npy", mmap_mode="r") if (folder / "size_cond.npy").is_file() else None
        self.labels = np.load(folder / "labels.npy", mmap_mode="r") if (folder / "labels.npy").is_file() else None
        self.num_classes, self.class_conditional, self.flip = base.num_classes, base.class_conditional, base.flip
        self.text = {p.stem[5:]: np.load(p, mmap_mode="r") for p in folder.glob("text_*.npy")}
        self.negative = {p.stem[9:]: np.load(p, mmap_mode="r") for p in folder.glob("negative_*.npy")}
        self.null = {p.stem[5:]: np.load(p) for p in folder.glob("null_*.npy")}
        self.captions = None
        if (folder / "captions.bin").is_file():
            blob = folder / "captions.bin"
            self.captions = Strings.from_arrays(np.load(folder / "captions_ends.npy", mmap_mode="r"),
                                                np.memmap(blob, dtype=np.uint8, mode="r") if blob.stat().st_size
                                                else b"")
        self.has_captions = self.captions is not None

    def __len__(self) -> int:
        return self.n

    def bucket_of(self) -> np.ndarray:
        return self.bucket_of_array

    def fetch(self, idx: Tensor, bucket: int = 0, *, flip: Tensor | None = None,
              dropped: Tensor | None = None) -> Samples:
        """Rows ``idx`` (all of bucket ``bucket``). A flip mirrors the cached latent (the approximation
        :class:`fewstep.data.LatentDataset` documents); a dropped caption gets the null text condition."""
        rows = idx.numpy()
        x = None
        if self.has_images and (self.buckets is None or len(set(self.bucket_of_array[rows].tolist())) <= 1):
            order = self.row_of[rows]
            x = torch.from_numpy(np.asarray(self.latents[bucket][order], dtype=np.float32))
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        labels = torch.from_numpy(np.asarray(self.labels[rows])) if (self.labels is not None and
                                                                    self.class_conditional) else None
        prompts = None
        if self.captions is not None:
            prompts = tuple("" if dropped is not None and dropped[j] else self.captions[int(i)]
                            for j, i in enumerate(rows))
        text = negative_text = None
        if self.text:
            text = Cond(**self._rows(self.text, rows), prompts=prompts)
            if dropped is not None and bool(dropped.any()):
                null = Cond(**{k: _loaded(v).expand(len(rows), *v.shape[1:])
                               for k, v in self.null.items()})
                text = text.where(dropped, null)
        if self.negative:
            negative_text = Cond(**self._rows(self.negative, rows))
        size = torch.from_numpy(np.asarray(self.size_cond[rows])) if self.size_cond is not None else None
        return Samples(x=x, labels=labels, prompts=prompts, size_cond=size, latent=True, text=text,
                       negative_text=negative_text)

    @staticmethod
    def _rows(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Tensor]:
        return {k: _loaded(v[rows]) for k, v in arrays.items()}

    def get(self, idx: Tensor, flip: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, tuple[str, ...] | None]:
        """The :class:`Dataset` interface: (latents, labels, captions) of rows ``idx``. Latents of different
        buckets cannot share a tensor: for rows of several buckets x is None (labels and captions are still
        given; pixels for evaluation come from ``base``)."""
        buckets = self.bucket_of_array[idx.numpy()]
        one = len(set(buckets.tolist())) <= 1
        s = self.fetch(idx, int(buckets[0]) if len(idx) and one else 0, flip=flip)
        return (s.x if one else None), s.labels, s.prompts

    def describe(self) -> str:
        return f"{self.base.describe()}; cached in {self.folder}"


def prepare_cache(dataset: RecordDataset, teacher: Any, root: Path, *, batch_size: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> RecordDataset | CachedDataset:
    """The dataset a run reads: ``dataset`` itself when ``data.cache`` is 'off', else its cache (opened, or
    built on first use in ``data.cache`` or the default folder under ``root``)."""
    cfg = dataset.cfg
    if cfg.cache == "off":
        return dataset
    folder = cache_folder(dataset, root) if cfg.cache == "auto" else Path(cfg.cache).expanduser()
    fp = fingerprint(dataset, teacher, cfg.cache_dtype)
    text = teacher.conditioning == "text" and dataset.has_captions
    return build_cache(folder, dataset, fp, encode_images=teacher.encode if dataset.has_images else None,
                       encode_text=teacher.encode_prompts if text else None, batch_size=batch_size,
                       progress=progress)


def cache_for_recipe(config: Any, *, batch_size: int = 64,
                     progress: Callable[[int, int], None] | None = None) -> CachedDataset:
    """`fewstep cache RECIPE`: load the recipe's teacher (in train.mixed_precision's dtype, as training does) and
    build (or open) the cache of its data, exactly as the trainer would on first use."""
    from fewstep.data import build_data, check_data
    from fewstep.paths import cache_dir
    from fewstep.teacher import load_teacher

    if config.teacher.pretrained is None:
        raise ValueError("fewstep cache: the recipe names no teacher.pretrained, so there is no encoder to cache for")
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.mixed_precision]
    device = "cuda" if torch.cuda.is_available() and not config.train.cpu else "cpu"
    teacher = load_teacher(config.teacher.pretrained, device=device, dtype=dtype)
    c, h, _ = teacher.data_shape
    cfg = config.data
    update: dict[str, Any] = {"resolution": cfg.resolution or h, "channels": cfg.channels or c}
    if teacher.conditioning == "class":
        update["class_conditional"] = True
    dataset = build_data(cfg.model_copy(update=update), cache_root=cache_dir())
    if not isinstance(dataset, RecordDataset):
        raise ValueError(f"fewstep cache: data.source '{cfg.source}' is read into memory (digits, image folders "
                         "without metadata, npz, idx, prompt lists); caches are for metadata folders, datasets and "
                         "webdataset shards")
    if cfg.cache == "off":
        raise ValueError("fewstep cache: the recipe sets data.cache: off; set it to 'auto' or a folder")
    check_data(config, teacher, dataset)
    out = prepare_cache(dataset, teacher, cache_dir(), batch_size=batch_size, progress=progress)
    assert isinstance(out, CachedDataset)
    return out
