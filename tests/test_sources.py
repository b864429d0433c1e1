"""Sources read per batch (metadata folders, datasets, webdataset shards): captions stay with their images,
the stream replays across a resume, and two ranks see disjoint halves of the one-process global batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import (
    BucketStream,
    DataConfig,
    DataStream,
    RecordDataset,
    TeacherInfo,
    build_data,
    check_data,
    load_image,
    nearest_buckets,
    require_source,
    source_kind,
)

N = 12  # samples; image i is a constant 8x8 gray image of value 20 * i, caption "sample i", label i % 3


def _value(x: torch.Tensor) -> list[int]:
    """Sample ids back from constant images in [-1, 1]."""
    return [round(((float(v) + 1) * 127.5) / 20) for v in x.mean(dim=(1, 2, 3))]


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(N):
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(paths[-1])
    return paths


def _rows() -> list[dict]:
    return [{"text": f"sample {i}", "label": i % 3, "negative_prompt": f"not {i}"} for i in range(N)]


def make_source(kind: str, root: Path) -> str:
    """Build a tiny source of ``kind`` under ``root``; returns data.source."""
    if kind in ("jsonl", "csv"):
        folder = root / "folder"
        paths = _images(folder / "sub")  # file_name may name a subfolder
        rows = [{"file_name": f"sub/{p.name}", **r} for p, r in zip(paths, _rows())]
        rows = rows[::-1]  # metadata order, not file-name order, is the source's order
        if kind == "jsonl":
            (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        else:
            lines = ["file_name,text,label,negative_prompt"] + [
                f'{r["file_name"]},"{r["text"]}, with a comma",{r["label"]},{r["negative_prompt"]}' for r in rows]
            (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
        return str(folder)
    if kind in ("datasets", "parquet", "arrow"):
        datasets = pytest.importorskip("datasets")
        paths = _images(root / "png")
        table = {"image": [str(p) for p in paths], **{k: [r[k] for r in _rows()] for k in _rows()[0]}}
        ds = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
        if kind in ("datasets", "arrow"):
            ds.save_to_disk(str(root / "saved"))
            arrow = next((root / "saved").glob("*.arrow"))  # one arrow file of the saved folder, memory-mapped
            return str(root / "saved") if kind == "datasets" else str(arrow)
        (root / "pq").mkdir()
        ds.to_parquet(str(root / "pq" / "train.parquet"))
        return str(root / "pq")
    wds = pytest.importorskip("webdataset")
    paths = _images(root / "png")
    (root / "shards").mkdir()
    for k in range(3):  # 3 shards of 4 samples; captions in .txt, labels and negatives in .json
        with wds.TarWriter(str(root / "shards" / f"part-{k:05d}.tar")) as w:
            for i in range(4 * k, 4 * k + 4):
                w.write({"__key__": f"s{i:03d}", "png": paths[i].read_bytes(), "txt": f"sample {i}",
                         "json": json.dumps({"label": i % 3, "negative_prompt": f"not {i}"}).encode()})
    return str(root / "shards" / "part-{00000..00002}.tar")


KINDS = ["jsonl", "csv", "datasets", "parquet", "arrow", "shards"]


@pytest.fixture(params=KINDS)
def source(request, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return request.param, make_source(request.param, tmp_path)


def _cfg(source: str, **kw) -> DataConfig:
    return DataConfig(source=source, resolution=8, channels=1, class_conditional=True, num_classes=3, **kw)


def test_captions_labels_and_negatives_stay_with_their_images(source, tmp_path):
    kind, src = source
    ds = build_data(_cfg(src), cache_root=tmp_path / "cache")
    assert isinstance(ds, RecordDataset) and len(ds) == N and ds.has_captions and ds.num_classes == 3
    stream = DataStream(ds, ds.cfg, seed=5, group=4)
    seen = []
    for start in range(0, N, 4):  # one epoch
        s = stream.read(start, 4, 0, 4)
        ids = _value(s.x)
        suffix = ", with a comma" if kind == "csv" else ""
        assert list(s.prompts) == [f"sample {i}{suffix}" for i in ids]
        assert s.labels.tolist() == [i % 3 for i in ids]
        assert list(s.negatives) == [f"not {i}" for i in ids]
        assert s.size_cond.tolist() == [[8, 8, 0, 0, 8, 8]] * 4
        seen += ids
    assert sorted(seen) == list(range(N))  # an epoch visits every sample once


def test_resume_replays_and_ranks_split_the_global_batch(source, tmp_path):
    _, src = source
    cfg = _cfg(src, flip=True, caption_dropout=0.3)
    ds = build_data(cfg, cache_root=tmp_path / "cache")
    one = DataStream(ds, cfg, seed=1, group=4)
    full = [one.read(p, 4, 0, 4) for p in range(0, 40, 4)]  # more than 3 epochs
    resumed = DataStream(build_data(cfg, cache_root=tmp_path / "cache"), cfg, seed=1, group=4)
    for k, p in enumerate(range(20, 40, 4)):  # a fresh stream started mid-epoch, as after --resume
        again = resumed.read(p, 4, 0, 4)
        assert torch.equal(again.x, full[5 + k].x) and again.prompts == full[5 + k].prompts
    ranks = [DataStream(build_data(cfg, cache_root=tmp_path / "cache"), cfg, seed=1, group=4) for _ in range(2)]
    for k, p in enumerate(range(0, 40, 4)):
        a, b = ranks[0].read(p, 4, 0, 2), ranks[1].read(p, 4, 2, 2)
        assert torch.equal(torch.cat([a.x, b.x]), full[k].x)
        assert a.prompts + b.prompts == full[k].prompts
        assert not set(_value(a.x)) & set(_value(b.x))
    dropped = [p == "" for s in full for p in s.prompts]
    assert 0 < sum(dropped) < len(dropped)  # caption dropout is drawn per position
    other_seed = DataStream(ds, cfg, seed=2, group=4)
    assert [other_seed.read(p, 4, 0, 4).prompts for p in range(0, 12, 4)] != [s.prompts for s in full[:3]]


def test_source_kinds_are_told_by_the_path(tmp_path):
    assert source_kind(DataConfig()) == "digits"
    assert source_kind(DataConfig(source="x/{000..009}.tar")) == "shards"
    src = make_source("jsonl", tmp_path)
    assert source_kind(DataConfig(source=src)) == "metadata"
    (tmp_path / "plain").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain" / "a.png")
    assert source_kind(DataConfig(source=str(tmp_path / "plain"))) == "folder"


def test_shard_stream_definition_and_seek(tmp_path):
    pytest.importorskip("webdataset")
    src = make_source("shards", tmp_path)
    cfg = _cfg(src)
    ds = build_data(cfg, cache_root=tmp_path / "cache")
    assert ds.source.counts.tolist() == [4, 4, 4]
    assert (tmp_path / "cache" / "shard_counts.json").is_file()  # counted once
    stream = DataStream(ds, cfg, seed=0, group=3)
    order0 = [stream.shards.locate(p)[1] for p in (0, 4, 8)]
    assert sorted(order0) == [0, 1, 2]
    # position p -> (epoch, shard, offset): the epoch's shard order, samples in stored order
    for p in range(0, 24):
        epoch, shard, offset = stream.shards.locate(p)
        ids = _value(DataStream(ds, cfg, seed=0, group=1).read(p, 1, 0, 1).x)
        assert epoch == p // N and ids == [4 * shard + offset]
    orders = {tuple(stream.shards.locate(p)[1] for p in range(e * N, (e + 1) * N, 4)) for e in range(6)}
    assert len(orders) > 1  # epochs visit the shards in different orders
    with pytest.raises(ValueError, match="buckets needs random access"):
        build_data(_cfg(src, buckets=[[8, 8]]), cache_root=tmp_path / "cache")


def test_limit_keeps_the_first_samples_in_source_order(source, tmp_path):
    kind, src = source
    ds = build_data(_cfg(src, limit=5), cache_root=tmp_path / "cache")
    assert len(ds) == 5
    x, _, prompts = ds.get(torch.arange(5))
    first = list(range(N - 1, N - 6, -1)) if kind in ("jsonl", "csv") else list(range(5))  # metadata is reversed
    assert _value(x) == first and prompts[0].startswith(f"sample {first[0]}")


# --- preprocessing --------------------------------------------------------------------------------


class _Rec:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def open(self) -> Image.Image:
        return Image.fromarray(self.array)


def test_resize_and_crops_with_size_conditioning():
    a = np.tile(np.arange(16, dtype=np.uint8)[None] * 16, (8, 1))  # 8 x 16, columns 0, 16, ..., 240
    x, size = load_image(_Rec(a), (8, 8), 1)
    assert size.tolist() == [8, 16, 0, 4, 8, 8]  # centre: columns 4..11
    torch.testing.assert_close(x[0, 0], torch.from_numpy(a[0, 4:12].astype(np.float32)) / 127.5 - 1)
    left, size = load_image(_Rec(a), (8, 8), 1, crop_u=(0.0, 0.0))
    right, size_r = load_image(_Rec(a), (8, 8), 1, crop_u=(0.5, 0.999))
    assert size.tolist()[2:4] == [0, 0] and size_r.tolist()[2:4] == [0, 8]
    torch.testing.assert_close(right[0, 0], torch.from_numpy(a[0, 8:16].astype(np.float32)) / 127.5 - 1)
    flipped, _ = load_image(_Rec(a), (8, 8), 1, crop_u=(0.0, 0.0), flip=True)
    assert torch.equal(flipped, left.flip(-1))
    small, size = load_image(_Rec(a), (4, 4), 3)  # resized by 1/2 to 4 x 8, then cropped; gray -> RGB
    assert small.shape == (3, 4, 4) and size.tolist() == [8, 16, 0, 2, 4, 4]


def test_random_crops_are_drawn_from_seed_and_position(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 24), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"c{i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(folder), resolution=8, channels=1, crop="random")
    a = DataStream(build_data(cfg), cfg, seed=0, group=8).read(0, 8, 0, 8)
    b = DataStream(build_data(cfg), cfg, seed=0, group=8).read(0, 8, 0, 8)
    assert torch.equal(a.x, b.x) and torch.equal(a.size_cond, b.size_cond)
    assert len(set(a.size_cond[:, 3].tolist())) > 1  # left offsets vary over samples, within 0..16
    assert a.size_cond[:, 3].min() >= 0 and a.size_cond[:, 3].max() <= 16
    with pytest.raises(ValueError, match="random apply to sources read per batch"):
        build_data(DataConfig(crop="random"))
    with pytest.raises(ValueError, match="data.caption_column is set but 'digits' is a digits source read into memory"):
        build_data(DataConfig(caption_column="text"))


def test_buckets_group_batches_by_aspect_ratio(tmp_path):
    folder = tmp_path / "aspect"
    folder.mkdir()
    rows = []
    for i in range(24):
        h, w = [(8, 8), (8, 16), (16, 8)][i % 3]
        Image.fromarray(np.full((h, w), i * 10, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"sample {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    buckets = [[8, 8], [4, 8], [8, 4]]
    cfg = DataConfig(source=str(folder), channels=1, buckets=buckets)
    ds = build_data(cfg)
    assert ds.bucket_of().tolist() == [0, 1, 2] * 8
    stream = DataStream(ds, cfg, seed=0, group=4)
    shapes = set()
    for p in range(0, 48, 4):
        s = stream.read(p, 4, 0, 4)
        ids = [round((v + 1) * 127.5 / 10) for v in s.x.mean(dim=(1, 2, 3)).tolist()]
        assert len({i % 3 for i in ids}) == 1  # one bucket per batch
        assert list(s.prompts) == [f"sample {i}" for i in ids]
        assert s.size_cond[:, 4:].tolist() == [list(s.x.shape[-2:])] * 4
        shapes.add(tuple(s.x.shape[-2:]))
    assert shapes == {(8, 8), (4, 8), (8, 4)}
    halves = [DataStream(ds, cfg, seed=0, group=4).read(8, 4, lo, 2) for lo in (0, 2)]
    assert torch.equal(torch.cat([h.x for h in halves]), stream.read(8, 4, 0, 4).x)
    with pytest.raises(ValueError, match="whole groups"):
        stream.read(2, 4, 0, 4)


def test_bucket_stream_epochs_and_remainders():
    bucket_of = np.array([0] * 10 + [1] * 5)
    stream = BucketStream(bucket_of, seed=3, group=4)
    assert stream.groups_per_epoch == 3  # 2 groups of bucket 0, 1 of bucket 1; remainders wait for the next epoch
    epoch = [stream.batch(p, 4) for p in range(0, 12, 4)]
    assert sorted(b for _, b in epoch) == [0, 0, 1]
    assert len({int(i) for idx, _ in epoch for i in idx}) == 12
    assert nearest_buckets(np.array([[10, 20], [20, 10], [9, 9]]), [(8, 8), (8, 16), (16, 8)]).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="no bucket holds a full"):
        BucketStream(np.array([0, 1, 2]), seed=0, group=2)


# --- guards ---------------------------------------------------------------------------------------


class _Config:
    def __init__(self, data: DataConfig, pretrained: Path | None = None) -> None:
        self.data = data
        self.teacher = type("T", (), {"pretrained": pretrained})()


def test_guards_name_the_problem(tmp_path):
    src = make_source("jsonl", tmp_path)
    text = TeacherInfo("text", None, (1, 8, 8))
    check_data(_Config(DataConfig(source=src)), text)  # captions present: fine
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "a.png")
    with pytest.raises(ValueError, match="text-conditional but .* has no captions"):
        check_data(_Config(DataConfig(source=str(plain))), text)
    with pytest.raises(ValueError, match="class_conditional is true but the source .plain. has no labels"):
        check_data(_Config(DataConfig(source=str(plain))), TeacherInfo("class", 3, (1, 8, 8)))
    with pytest.raises(ValueError, match="labels up to 2 but the teacher knows 2 classes"):
        check_data(_Config(DataConfig(source=src)), TeacherInfo("class", 2, (1, 8, 8)))
    with pytest.raises(ValueError, match="data.resolution=16 but the teacher generates 8x8"):
        check_data(_Config(DataConfig(source=src, resolution=16)), text)
    with pytest.raises(ValueError, match="not multiples of the VAE's downsampling factor 8"):
        check_data(_Config(DataConfig(source=src, buckets=[[64, 60]])), TeacherInfo("text", None, (3, 64, 64), 8))
    rgb = plain.parent / "rgb"
    rgb.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb / "a.png")
    with pytest.raises(ValueError, match="3-channel images but the teacher takes 1"):
        check_data(_Config(DataConfig(source=str(rgb))), TeacherInfo("none", None, (1, 8, 8)),
                   build_data(DataConfig(source=str(rgb))))


def test_data_source_is_required_for_your_own_teacher(tmp_path):
    with pytest.raises(ValueError, match="data.source: required when teacher.pretrained is your own teacher"):
        require_source(DataConfig(), tmp_path / "my-teacher")
    require_source(DataConfig(source="digits"), tmp_path / "my-teacher")  # explicit digits: on purpose
    require_source(DataConfig(), None)
    shipped = Path(__file__).resolve().parent.parent / "recipes" / "digits" / "teacher"
    require_source(DataConfig(), shipped)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "jsonl"])
def test_training_on_a_per_batch_source_resumes_exactly(kind, tmp_path, monkeypatch):
    """A CD run reading webdataset shards (or a metadata folder) live, with flips and random crops: resumed from
    its step-2 checkpoint it logs the same losses and ends with the same weights as the uninterrupted run
    (8x8 images at the teacher's 8x8: the crop draws happen, the windows are the whole image)."""
    import shutil

    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    src = make_source(kind, tmp_path)
    config = tiny_run_config(teacher, {"name": "cd"}, steps=5, batch=4,
                             data={"source": src, "limit": None, "flip": True, "crop": "random", "cache": "off"},
                             train={"checkpoint_every_nimg": 8, "keep_checkpoints": 10})
    full, rec_full = run_tiny(config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    resumed, rec_res = run_tiny(config, tmp_path / "resumed", resume=True)
    assert rec_res.logs == rec_full.logs[2:]
    for k, v in full.nets.student.state_dict().items():
        assert torch.equal(v, resumed.nets.student.state_dict()[k]), k


def test_caption_only_datasets_source(tmp_path):
    """A datasets set without an image column is a prompt-only source read per batch (data-free methods)."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(10)]}).save_to_disk(str(tmp_path / "p"))
    cfg = DataConfig(source=str(tmp_path / "p"))
    ds = build_data(cfg)
    assert not ds.has_images and ds.has_captions and ds.shape is None
    s = DataStream(ds, cfg, seed=0, group=5).read(0, 5, 0, 5)
    assert s.x is None and s.size_cond is None and len(set(s.prompts)) == 5
    assert all(p.startswith("prompt ") for p in s.prompts)
    check_data(_Config(cfg), TeacherInfo("text", None, (1, 8, 8)))


def test_build_dataset_gives_per_batch_sources_too(tmp_path, monkeypatch):
    """Callers of build_dataset (e.g. an evaluation reference) can name a source read per batch."""
    from fewstep.data import build_dataset

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    ds = build_dataset(DataConfig(source=make_source("shards", tmp_path), resolution=8, channels=1))
    assert isinstance(ds, RecordDataset) and ds.has_images and len(ds) == N
    x, _, prompts = ds.get(torch.arange(N))
    assert _value(x) == list(range(N)) and prompts[3] == "sample 3"


@pytest.mark.slow  # ~17 s on a busy 2-core machine: four tiny teachers saved and loaded
def test_teacher_info_reads_the_json_configs(tmp_path):
    from fewstep.data import teacher_info
    from fewstep.teacher import load_teacher
    from fewstep.testing import make_tiny_teacher

    cases = (("unet_condition", {"latent": True}), ("unet", {"conditioning": "class"}), ("unet", {}), ("dit", {}))
    for i, (kind, options) in enumerate(cases):
        folder = make_tiny_teacher(tmp_path / f"teacher{i}", kind, **options)
        info, loaded = teacher_info(folder), load_teacher(folder)
        assert (info.conditioning, info.num_classes, info.data_shape) == (
            loaded.conditioning, loaded.num_classes, loaded.data_shape), (kind, options)
