"""Image-caption sources read per batch: an image folder with ``metadata.jsonl`` / ``metadata.csv``, a local
Hugging Face ``datasets`` set (``save_to_disk`` folder, parquet or arrow files) and webdataset tar shards.

Nothing here holds images in memory: a source hands out :class:`Record` objects whose image is opened
(lazily, by PIL) only when a batch is preprocessed. What each source keeps per sample is small and fixed:
file names and captions packed into one bytes blob with an offsets array (:class:`Strings`), or nothing at
all (``datasets`` memory-maps its arrow files; tar shards are read as a stream).

Indexable sources (``folder`` with metadata, ``datasets``) are read by sample index through the run's
:class:`fewstep.data.IndexStream`. Webdataset shards are a stream: position p of the stream (p = images
seen) is a pure function of (seed, p), defined in :class:`ShardStream`.

The optional libraries (``pip install 'fewstep[data]'``: datasets, webdataset) are imported only by the
source that needs them.
"""

from __future__ import annotations

import csv
import io
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "HFSource",
    "MetadataFolderSource",
    "Record",
    "ShardSource",
    "ShardStream",
    "Strings",
    "is_hf_dataset",
    "is_metadata_folder",
    "is_shard_pattern",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CAPTION_COLUMNS = ("text", "caption", "prompt")  # tried in this order when data.caption_column is unset
LABEL_COLUMNS = ("label", "labels", "class")
NEGATIVE_COLUMNS = ("negative_prompt", "negative")
IMAGE_COLUMNS = ("image", "img", "png", "jpg")
_WDS_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
_EXTRA_HINT = "install the optional data libraries with `pip install 'fewstep[data]'`"


@dataclass(frozen=True)
class Record:
    """One sample before preprocessing: where its image is, and its caption / label / negative prompt.

    image: a path or the encoded bytes (PNG/JPEG/...), or None for a caption-only record.
    """

    key: str
    image: Path | bytes | None
    caption: str | None = None
    label: int | None = None
    negative: str | None = None

    def open(self) -> Image.Image:
        """The image, decoded by PIL (call ``.load()`` or convert it before closing)."""
        from PIL import Image

        if self.image is None:
            raise ValueError(f"sample {self.key!r} has no image")
        return Image.open(io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image)


class Strings:
    """N strings packed into one UTF-8 blob plus an int64 array of end offsets: about 8 bytes of overhead per
    string instead of ~50 for a Python str, so 100 000 captions of 40 characters cost ~5 MB. Built by
    :meth:`append` without ever holding the strings as Python objects."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.blob = bytearray()
        self.ends = array("q")
        for v in values:
            self.append(v)

    @classmethod
    def from_arrays(cls, ends: Any, blob: Any) -> Strings:
        """Strings over existing arrays, e.g. memory-mapped ones: ends (N,) int64, blob (bytes,) uint8."""
        out = cls()
        out.ends, out.blob = ends, blob
        return out

    def append(self, value: str) -> None:
        self.blob += value.encode("utf-8")
        self.ends.append(len(self.blob))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        i = i + len(self) if i < 0 else i
        start = self.ends[i - 1] if i > 0 else 0
        return bytes(self.blob[int(start) : int(self.ends[i])]).decode("utf-8")


def _pick(name: str | None, available: Sequence[str], candidates: Sequence[str], field: str, where: str,
          required: bool = False) -> str | None:
    """The column named by data.<field>, else the first candidate present; errors list what exists."""
    if name is not None:
        if name not in available:
            raise ValueError(f"data.{field}: column {name!r} is not in {where}; available columns: {list(available)}")
        return name
    found = next((c for c in candidates if c in available), None)
    if found is None and required:
        raise ValueError(f"{where} has none of the columns {list(candidates)}; available columns: "
                         f"{list(available)}; set data.{field}")
    return found


class _Columns:
    """Which columns of a tabular source hold what (resolved once from the config)."""

    def __init__(self, cfg: Any, available: Sequence[str], where: str) -> None:
        self.caption = _pick(cfg.caption_column, available, CAPTION_COLUMNS, "caption_column", where)
        self.label = _pick(cfg.label_column, available, LABEL_COLUMNS, "label_column", where)
        self.negative = _pick(cfg.negative_column, available, NEGATIVE_COLUMNS, "negative_column", where)


def _label(value: Any, key: str, where: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {value!r} of sample {key!r} is not an integer class id") from None
    if label < 0:
        raise ValueError(f"{where}: label {label} of sample {key!r} is negative; class ids are 0..K-1")
    return label


# --------------------------------------------------------------------------------------- folder


def is_metadata_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file())


class MetadataFolderSource:
    """An image folder in the ``imagefolder`` convention of diffusers / ``datasets``: ``metadata.jsonl`` (one
    JSON object per line) or ``metadata.csv`` (header row) with a ``file_name`` column (relative to the folder,
    subfolders allowed) and optional caption, label and negative-prompt columns, picked by name."""

    def __init__(self, root: Path, cfg: Any) -> None:
        self.root, self.name = root, root.name
        meta = root / "metadata.jsonl"
        rows = _read_jsonl(meta) if meta.is_file() else _read_csv(root / "metadata.csv")
        meta = meta if meta.is_file() else root / "metadata.csv"
        where = f"'{meta}'"
        available: list[str] = []
        files, captions, negatives, labels = Strings(), Strings(), Strings(), array("q")
        cols: _Columns | None = None
        for i, row in enumerate(rows):
            if cols is None:
                available = list(row)
                if "file_name" not in row:
                    raise ValueError(f"{where} has no 'file_name' column (columns: {available}); the imagefolder "
                                     "convention names each image's path relative to the folder in file_name")
                cols = _Columns(cfg, available, where)
            name = row.get("file_name")
            if not name:
                raise ValueError(f"{where}: row {i + 1} has no file_name")
            files.append(str(name))
            if cols.caption is not None:
                captions.append(str(row.get(cols.caption) or ""))
            if cols.negative is not None:
                negatives.append(str(row.get(cols.negative) or ""))
            if cols.label is not None:
                labels.append(_label(row.get(cols.label), str(name), where))
            if cfg.limit is not None and len(files) >= cfg.limit:
                break
        if not files:
            raise ValueError(f"{where} lists no images; add one row per image")
        assert cols is not None
        missing = next((f for f in (files[0], files[-1]) if not (root / f).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{where} names '{missing}', which is not a file in {root}")
        self.files = files
        self.captions = captions if cols.caption is not None else None
        self.negatives = negatives if cols.negative is not None else None
        self.labels = np.frombuffer(labels, dtype=np.int64) if cols.label is not None else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else None
        self.columns = cols

    def __len__(self) -> int:
        return len(self.files)

    def records(self, idx: Sequence[int]) -> list[Record]:
        return [Record(key=self.files[i], image=self.root / self.files[i],
                       caption=self.captions[i] if self.captions is not None else None,
                       label=int(self.labels[i]) if self.labels is not None else None,
                       negative=self.negatives[i] if self.negatives is not None else None) for i in idx]


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"'{path}' line {n} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"'{path}' line {n} is not a JSON object with a file_name field")
            yield row


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


# --------------------------------------------------------------------------------------- datasets


def is_hf_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in (".parquet", ".arrow")
    if not path.is_dir():
        return False
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return True
    return any(p.suffix.lower() in (".parquet", ".arrow") for p in path.iterdir()) and not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


class HFSource:
    """A local Hugging Face ``datasets`` set, memory-mapped: a ``save_to_disk`` folder (a DatasetDict folder
    uses ``data.split``), one .parquet / .arrow file, or a folder of them (parquet is converted once into
    ``datasets``' own arrow cache under ``cache_dir``). The image column may be an ``Image`` feature or raw
    encoded bytes; images are decoded per batch."""

    def __init__(self, path: Path, cfg: Any, cache_dir: Path | None = None) -> None:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"data.source '{path}' is a Hugging Face datasets set; {_EXTRA_HINT}") from None
        self.name = path.name
        ds = _open_hf(datasets, path, cfg.split, cache_dir)
        where = f"the dataset '{path}'"
        columns = list(ds.column_names)
        self.image_column = _pick(cfg.image_column, columns, IMAGE_COLUMNS, "image_column", where)
        cols = _Columns(cfg, columns, where)
        if cfg.limit is not None:
            ds = ds.select(range(min(cfg.limit, len(ds))))
        if len(ds) == 0:
            raise ValueError(f"{where} holds no rows")
        self.ds, self.columns = ds, cols
        # Rows as arrow: images stay encoded ({"bytes", "path"} structs or binary) until a batch decodes them.
        # (cast_column(Image(decode=False)) would rewrite the whole table in memory.)
        self.rows = ds.with_format("arrow")
        self.captions = cols.caption
        self.num_classes = None
        if cols.label is not None:
            feature = ds.features[cols.label]
            if isinstance(feature, datasets.ClassLabel):
                self.num_classes = int(feature.num_classes)
            else:
                import pyarrow.compute as pc

                column = ds.data.column(cols.label)
                if pc.min(column).as_py() < 0:
                    raise ValueError(f"{where}: column {cols.label!r} holds negative labels; class ids are 0..K-1")
                self.num_classes = int(pc.max(column).as_py()) + 1
        self.labels = cols.label
        self.negatives = cols.negative

    def __len__(self) -> int:
        return len(self.ds)

    def records(self, idx: Sequence[int]) -> list[Record]:
        table = self.rows[list(idx)]  # one batched read of the memory-mapped table
        rows = {name: table.column(name).to_pylist() for name in
                {self.image_column, self.captions, self.labels, self.negatives} - {None}}
        out = []
        for j, i in enumerate(idx):
            image = rows[self.image_column][j] if self.image_column is not None else None
            if isinstance(image, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
                image = image.get("bytes") or (Path(image["path"]) if image.get("path") else None)
            out.append(Record(
                key=str(i), image=image,
                caption=str(rows[self.captions][j] or "") if self.captions else None,
                label=_label(rows[self.labels][j], str(i), self.name) if self.labels else None,
                negative=str(rows[self.negatives][j] or "") if self.negatives else None))
        return out


def _open_hf(datasets: Any, path: Path, split: str, cache_dir: Path | None) -> Any:
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.split: '{path}' has the splits {list(ds)}, not {split!r}")
            ds = ds[split]
        return ds
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".arrow"))
    kinds = {p.suffix.lower() for p in files}
    if kinds == {".arrow"}:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in files])
    if kinds == {".parquet"}:
        return datasets.Dataset.from_parquet([str(p) for p in files],
                                             cache_dir=str(cache_dir) if cache_dir is not None else None)
    raise ValueError(f"data.source: '{path}' mixes .parquet and .arrow files; give one kind")


# --------------------------------------------------------------------------------------- webdataset


def is_shard_pattern(value: str) -> bool:
    return value.endswith(".tar") or value.endswith(".tar}") or (".tar" in value and "{" in value)


class ShardSource:
    """Webdataset tar shards named by a path with brace ranges, e.g. ``data/{00000..00099}.tar``.

    A sample is the group of tar members sharing a key (webdataset's convention): the image from its first
    ``png``/``jpg``/``jpeg``/``webp``/``bmp`` member, the caption from ``txt`` or the caption field of
    ``json``, the label from ``cls`` or the label field of ``json``, a negative prompt from the json's
    negative field. The canonical order is the shards as listed, samples in stored order; sample counts per
    shard are read once (one pass over the tar headers and data) and remembered in ``cache_dir``.
    """

    def __init__(self, pattern: str, cfg: Any, cache_dir: Path | None = None) -> None:
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise ImportError(f"data.source '{pattern}' names webdataset shards; {_EXTRA_HINT}") from None
        self.name = Path(pattern).name
        self.shards = [str(Path(s)) for s in expand_urls(pattern)]
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"data.source: {len(missing)} of the {len(self.shards)} shards of '{pattern}' "
                                    f"do not exist, e.g. '{missing[0]}'")
        self.cfg = cfg
        self.counts = np.asarray(_shard_counts(self.shards, cache_dir), dtype=np.int64)
        if cfg.limit is not None:  # keep the first `limit` samples in canonical order
            keep, total = [], 0
            for c in self.counts:
                keep.append(min(int(c), cfg.limit - total))
                total += keep[-1]
            self.counts = np.asarray([c for c in keep if c > 0], dtype=np.int64)
            self.shards = self.shards[: len(self.counts)]
        if self.counts.sum() == 0:
            raise ValueError(f"data.source: the shards of '{pattern}' hold no samples")
        first = self._raw(0, 0, 1)[0]
        json_keys = list(json.loads(first["json"])) if "json" in first else []
        where = f"the json of sample {first['__key__']!r} in '{self.shards[0]}'"
        self.image_key = next((k for k in _WDS_IMAGE_KEYS if k in first), None)
        self.caption_json = None if "txt" in first else _pick(cfg.caption_column, json_keys, CAPTION_COLUMNS,
                                                              "caption_column", where)
        self.label_json = None if "cls" in first else _pick(cfg.label_column, json_keys, LABEL_COLUMNS,
                                                            "label_column", where)
        self.negative_json = _pick(cfg.negative_column, json_keys, NEGATIVE_COLUMNS, "negative_column", where)
        self.has_captions = "txt" in first or self.caption_json is not None
        self.has_labels = "cls" in first or self.label_json is not None
        self.num_classes = None  # labels of a stream are not scanned; class-conditional runs need data.num_classes

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _raw(self, shard: int, skip: int, count: int) -> list[dict[str, Any]]:
        out = []
        for sample in self.iter_shard(shard, skip):
            out.append(sample)
            if len(out) == count:
                break
        return out

    def iter_shard(self, shard: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Raw samples (undecoded bytes) of shard ``shard`` from its ``skip``-th on."""
        import webdataset as wds

        limit = int(self.counts[shard])
        for k, sample in enumerate(wds.tarfile_samples([{"url": self.shards[shard]}])):
            if k >= limit:
                return
            if k >= skip:
                yield sample

    def record(self, sample: dict[str, Any]) -> Record:
        key = sample["__key__"]
        meta = json.loads(sample["json"]) if "json" in sample else {}
        caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else (
            str(meta.get(self.caption_json) or "") if self.caption_json else None)
        label = sample["cls"].decode() if "cls" in sample else (meta.get(self.label_json) if self.label_json else None)
        return Record(key=key, image=sample.get(self.image_key) if self.image_key else None, caption=caption,
                      label=_label(label, key, self.shards[0]) if label is not None else None,
                      negative=str(meta.get(self.negative_json) or "") if self.negative_json else None)

    def records(self, idx: Sequence[int]) -> list[Record]:
        """Records by canonical index (shards as listed, samples in stored order). Reads each needed shard from
        its start up to the last wanted sample: meant for a few samples (evaluation references, validation
        prompts) and for building caches in order, not for training batches."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        wanted: dict[int, dict[int, list[int]]] = {}
        for j, i in enumerate(idx):
            if not 0 <= i < starts[-1]:
                raise IndexError(f"sample {i} is out of range for {starts[-1]} samples")
            s = int(np.searchsorted(starts, i, side="right")) - 1
            wanted.setdefault(s, {}).setdefault(int(i - starts[s]), []).append(j)
        out: list[Record | None] = [None] * len(idx)
        for s, offsets in wanted.items():
            last = max(offsets)
            for k, sample in enumerate(self.iter_shard(s)):
                for j in offsets.get(k, ()):
                    out[j] = self.record(sample)
                if k >= last:
                    break
        return [r for r in out if r is not None]

    def iter_records(self) -> Iterator[Record]:
        """Every record in canonical order (cache builds)."""
        for s in range(len(self.shards)):
            for sample in self.iter_shard(s):
                yield self.record(sample)


def _shard_counts(shards: list[str], cache_dir: Path | None) -> list[int]:
    """Samples per shard, counted once and remembered per (path, size, mtime) in cache_dir/shard_counts.json."""
    import webdataset as wds

    memo_path = cache_dir / "shard_counts.json" if cache_dir is not None else None
    memo: dict[str, int] = {}
    if memo_path is not None and memo_path.is_file():
        memo = json.loads(memo_path.read_text())
    counts, changed = [], False
    for s in shards:
        st = Path(s).stat()
        key = f"{Path(s).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sum(1 for _ in wds.tarfile_samples([{"url": s}]))
            changed = True
        counts.append(memo[key])
    if changed and memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return counts


class ShardStream:
    """Exact, resumable order of a webdataset stream: a pure function of (seed, position).

    Definition. N = total samples. Position p (images seen) is in epoch e = p // N at offset o = p % N.
    Epoch e visits the shards in the permutation of the shard list seeded by (seed, e), each shard's samples
    in stored order; o is mapped to (shard, offset in shard) through the cumulative counts in that order.
    Resuming at p therefore opens one shard and skips ``offset`` samples (read, never decoded). With several
    processes, rank r keeps positions [start + r*B, start + (r+1)*B) of each global micro-batch, like the
    index stream; every rank reads (but decodes only its share of) the whole stream.

    The reader keeps one open shard iterator, so consecutive reads continue where the last one stopped.
    """

    def __init__(self, source: ShardSource, seed: int) -> None:
        self.source, self.seed = source, seed
        self.n = len(source)
        self._cursor: tuple[int, Iterator[dict[str, Any]]] | None = None  # (next position, its iterator)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start position of each shard in that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            from fewstep.data import _mix_seed

            rng = np.random.Generator(np.random.PCG64(_mix_seed(self.seed, epoch, 7)))
            order = rng.permutation(len(self.source.shards))
            starts = np.concatenate([[0], np.cumsum(self.source.counts[order])])
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard index, offset within that shard) of stream position ``position``."""
        epoch, o = divmod(position, self.n)
        order, starts = self._order(epoch)
        k = int(np.searchsorted(starts, o, side="right")) - 1
        return epoch, int(order[k]), int(o - starts[k])

    def _iterate(self, position: int) -> Iterator[dict[str, Any]]:
        epoch, shard, offset = self.locate(position)
        order, _ = self._order(epoch)
        k = int(np.where(order == shard)[0][0])
        yield from self.source.iter_shard(shard, offset)
        while True:  # the rest of this epoch, then the following epochs
            k += 1
            if k == len(order):
                epoch, k = epoch + 1, 0
                order, _ = self._order(epoch)
            yield from self.source.iter_shard(int(order[k]))

    def read(self, start: int, count: int, keep: slice) -> list[Record]:
        """Records at positions [start, start + count)[keep]; the others are skipped without decoding."""
        if self._cursor is None or self._cursor[0] > start:
            self._cursor = (start, self._iterate(start))
        pos, it = self._cursor
        if start - pos > self.n // max(len(self.source.shards), 1):  # far ahead: seek instead of reading through
            pos, it = start, self._iterate(start)
        for _ in range(start - pos):
            next(it)
        wanted = set(range(count)[keep])
        out = []
        for j in range(count):
            sample = next(it)
            if j in wanted:
                out.append(self.source.record(sample))
        self._cursor = (start + count, it)
        return out
