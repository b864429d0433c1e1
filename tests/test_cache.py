"""fewstep.cache: latents and text embeddings encoded once into memory-mapped files; atomic, resumable,
fingerprinted (stale caches are refused); training reads the same batches from the cache as live."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.cache import (
    CachedDataset,
    StaleCacheError,
    build_cache,
    fingerprint,
    prepare_cache,
    weights_digest,
)
from fewstep.data import DataConfig, DataStream, build_data
from fewstep.types import Cond
from tests.test_sources import N, _value, make_source


class FakeTeacher:
    """A text teacher with a 2x2 average-pool "VAE" (scaled by a weight) and a closed-form text encoder:
    embeddings (B, 2, 3) = [len(prompt), sum of code points mod 97, 1] twice; pooled (B, 3)."""

    conditioning = "text"
    vae_shift = 0.0
    tokenizer = None

    def __init__(self, scale: float = 1.0) -> None:
        self.vae = nn.Linear(1, 1, bias=False)
        self.vae.weight.data.fill_(scale)
        self.vae_scale = 1.0
        self.text_encoder = nn.Linear(1, 1, bias=False)
        self.text_encoder.weight.data.fill_(1.0)
        self.images = self.prompts = 0
        self.fail_after: int | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.images >= self.fail_after:
            raise KeyboardInterrupt  # an interrupted build
        self.images += len(x)
        return torch.nn.functional.avg_pool2d(x, 2) * self.vae.weight.item()

    def encode_prompts(self, prompts: list[str]) -> Cond:
        self.prompts += len(prompts)
        rows = torch.tensor([[len(p), sum(map(ord, p)) % 97, 1.0] for p in prompts])
        return Cond(embeddings=rows[:, None].repeat(1, 2, 1), pooled=rows * 2, prompts=tuple(prompts))


@pytest.fixture
def data(tmp_path):
    src = make_source("jsonl", tmp_path)
    return build_data(DataConfig(source=src, resolution=8, channels=1, cache=str(tmp_path / "c")))


def _build(ds, teacher, folder, **kw):
    fp = fingerprint(ds, teacher, "float32")
    return build_cache(folder, ds, fp, encode_images=teacher.encode, encode_text=teacher.encode_prompts,
                       batch_size=5, **kw)


def test_cache_holds_what_live_encoding_gives(data, tmp_path):
    teacher = FakeTeacher()
    cache = prepare_cache(data, teacher, tmp_path / "root")
    assert isinstance(cache, CachedDataset) and cache.folder == tmp_path / "c"
    assert teacher.images == N and teacher.prompts == 2 * N + 1  # captions, negatives, the null prompt once
    assert not (tmp_path / "c.partial").exists() and (tmp_path / "c" / "meta.json").is_file()
    assert isinstance(np.load(tmp_path / "c" / "latents_0.npy", mmap_mode="r"), np.memmap)
    cfg = data.cfg.model_copy(update={"caption_dropout": 0.4, "flip": True})
    live, cached = DataStream(data, cfg, seed=0, group=4), DataStream(cache, cfg, seed=0, group=4)
    for p in range(0, 24, 4):
        a, b = live.read(p, 4, 0, 4), cached.read(p, 4, 0, 4)
        torch.testing.assert_close(teacher.encode(a.x), b.x)
        assert a.prompts == b.prompts and torch.equal(a.size_cond, b.size_cond)
        expected = teacher.encode_prompts(list(a.prompts))  # dropped captions: the empty prompt's embedding
        torch.testing.assert_close(b.text.embeddings, expected.embeddings)
        torch.testing.assert_close(b.text.pooled, expected.pooled)
        torch.testing.assert_close(b.negative_text.embeddings, teacher.encode_prompts(list(a.negatives)).embeddings)
    again = FakeTeacher()
    reopened = prepare_cache(data, again, tmp_path / "root")
    assert again.images == 0 and again.prompts == 0 and len(reopened) == N  # read, not re-encoded
    x, _, prompts = reopened.get(torch.arange(3))
    assert x.shape == (3, 1, 4, 4) and prompts[0] == f"sample {N - 1}"
    assert reopened.base is data  # pixels for evaluation against the training images


def test_stale_caches_are_refused(data, tmp_path):
    prepare_cache(data, FakeTeacher(), tmp_path / "root")
    with pytest.raises(StaleCacheError, match="vae.weights: cache has '[0-9a-f]{12}...'"):
        prepare_cache(data, FakeTeacher(scale=2.0), tmp_path / "root")
    other = build_data(data.cfg.model_copy(update={"resolution": 4}))
    with pytest.raises(StaleCacheError, match="preprocess.resolution: cache has 8, the run has 4.*Delete the folder"):
        prepare_cache(other, FakeTeacher(), tmp_path / "root")
    auto = build_data(data.cfg.model_copy(update={"cache": "auto"}))
    assert prepare_cache(auto, FakeTeacher(), tmp_path / "root").folder.parent == tmp_path / "root" / "data"
    assert weights_digest(FakeTeacher().vae) != weights_digest(FakeTeacher(2.0).vae)


def test_an_interrupted_build_resumes(data, tmp_path):
    teacher = FakeTeacher()
    teacher.fail_after = 5  # the second chunk of 5 fails
    with pytest.raises(KeyboardInterrupt):
        _build(data, teacher, tmp_path / "r")
    progress = json.loads((tmp_path / "r.partial" / "progress.json").read_text())
    assert progress["done"] == 5 and not (tmp_path / "r").exists()
    resumed = FakeTeacher()
    cache = _build(data, resumed, tmp_path / "r")
    assert resumed.images == N - 5  # only the rest was encoded
    whole = _build(data, FakeTeacher(), tmp_path / "whole")
    assert np.array_equal(np.load(tmp_path / "r" / "latents_0.npy"), np.load(tmp_path / "whole" / "latents_0.npy"))
    assert [cache.captions[i] for i in range(N)] == [whole.captions[i] for i in range(N)]
    assert np.array_equal(np.load(tmp_path / "r" / "text_embeddings.npy"),
                          np.load(tmp_path / "whole" / "text_embeddings.npy"))


def test_shards_cache_then_read_in_random_order(tmp_path):
    src = make_source("shards", tmp_path)
    ds = build_data(DataConfig(source=src, resolution=8, channels=1, cache=str(tmp_path / "c")),
                    cache_root=tmp_path / "root")
    teacher = FakeTeacher()
    cache = prepare_cache(ds, teacher, tmp_path / "root")
    assert teacher.images == N and [cache.captions[i] for i in range(N)] == [f"sample {i}" for i in range(N)]
    x, _, prompts = cache.get(torch.tensor([7, 2]))
    assert prompts == ("sample 7", "sample 2")
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([20.0 * 7, 20.0 * 2]) / 127.5 - 1)
    stream = DataStream(cache, ds.cfg, seed=0, group=4)  # cached shards are indexable: the index stream
    ids = [round((float(v) + 1) * 127.5 / 20) for p in range(0, N, 4) for v in stream.read(p, 4, 0, 4).x[:, 0, 0, 0]]
    assert sorted(ids) == list(range(N)) and ids != list(range(N))


def test_random_crops_are_not_cached(data, tmp_path):
    cache = prepare_cache(data, FakeTeacher(), tmp_path / "root")
    with pytest.raises(ValueError, match="random crops apply to images decoded per batch"):
        DataStream(cache, data.cfg.model_copy(update={"crop": "random"}), seed=0, group=4)
    off = build_data(data.cfg.model_copy(update={"cache": "off"}))
    assert prepare_cache(off, FakeTeacher(), tmp_path / "root") is off
    assert _value(DataStream(off, off.cfg, seed=0, group=4).read(0, 4, 0, 4).x)  # live decoding still works


def test_cli_cache_and_training_read_the_cache(tmp_path, monkeypatch):
    """A tiny latent text teacher on a metadata folder: `fewstep cache` encodes; a CD run then reads the cache
    (no encoder call for data), and `fewstep validate` accepts the recipe."""
    import yaml

    from fewstep import cli
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet_condition", latent=True)
    src = make_source("jsonl", tmp_path)
    config = tiny_run_config(teacher, {"name": "cd"}, steps=2, batch=4,
                             data={"source": src, "limit": None, "channels": 1, "caption_dropout": 0.1},
                             validation={"prompts": ["a validation prompt"]})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(config.dump()))
    assert cli.main(["validate", str(recipe)]) == 0
    assert cli.main(["cache", str(recipe)]) == 0
    folders = list((tmp_path / "cache" / "data").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    stamp = (folders[0] / "meta.json").stat().st_mtime_ns
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert isinstance(trainer.dataset, CachedDataset) and len(rec.logs) == 2
    assert (folders[0] / "meta.json").stat().st_mtime_ns == stamp  # read, not rebuilt
    batch = trainer.batch(0)
    assert batch.x0.shape == (4, *trainer.nets.teacher.sample_shape) and batch.cond.embeddings.shape[0] == 4
    _, cond = trainer.validation_inputs()
    assert set(cond.prompts) == {"a validation prompt"}
    unlabeled = tiny_run_config(teacher, {"name": "cd"}, data={"source": str(Path(src) / "sub"), "limit": None})
    recipe.write_text(yaml.safe_dump(unlabeled.dump()))
    assert cli.main(["validate", str(recipe)]) != 0  # a text teacher on images without captions


def test_tiny_text_teacher_example_and_its_recipe(tmp_path, monkeypatch):
    """examples/make_tiny_text_teacher.py writes a stock SD pipeline folder fewstep loads and a metadata.jsonl
    caption set; recipes/text/cd.yaml validates against them with its inputs checked."""
    import importlib.util

    from fewstep import cli
    from fewstep.teacher import load_teacher

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("make_tiny_text_teacher",
                                                  root / "examples" / "make_tiny_text_teacher.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.make_data(tmp_path / "data", 12, 0)
    example.make_teacher(tmp_path / "teacher", 0)
    rows = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["text"].startswith("a ") and (tmp_path / "data" / rows[0]["file_name"]).is_file()
    teacher = load_teacher(tmp_path / "teacher")
    assert teacher.conditioning == "text" and teacher.data_shape == (3, 32, 32) and teacher.vae is not None
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    assert cli.main(["validate", str(root / "recipes" / "text" / "cd.yaml"), "--set",
                     f"teacher.pretrained={tmp_path / 'teacher'}", "--set", f"data.source={tmp_path / 'data'}"]) == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_build_one_cache_and_match_one_process(tmp_path, monkeypatch):
    """2 gloo ranks on webdataset shards with a latent text teacher: the main process builds the cache while
    the other waits, each rank reads its half of every global batch (flips, caption dropout), and both end
    with the weights of a 1-process run on the same global batch."""
    from fewstep.testing import (
        assert_ranks_match,
        make_tiny_teacher,
        network_state,
        run_on_ranks,
        run_tiny,
        tiny_run_config,
    )

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet_condition", latent=True)
    src = make_source("shards", tmp_path)
    config = tiny_run_config(teacher, {"name": "cd"}, steps=3, batch=4,
                             data={"source": src, "limit": None, "channels": 1, "flip": True, "caption_dropout": 0.3})
    ranks = run_on_ranks(config, tmp_path / "multi", tmp_path / "ranks")
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1  # one cache, complete (no .partial left)
    single, _ = run_tiny(config, tmp_path / "single")
    assert isinstance(single.dataset, CachedDataset)
    # rounding: the all-reduce sums the two halves' gradients in another order than one process (measured 1.3e-6)
    assert_ranks_match(ranks, network_state(single.nets, ("student",)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sdxl_buckets_feed_size_conditioning(tmp_path, monkeypatch):
    """A tiny SDXL teacher on a metadata folder with aspect-ratio buckets: every batch is one bucket, its latents
    have the bucket's size, and cond.added / uncond.added (SDXL's time ids) are the batch's per-sample original
    size, crop and target size; the cached run trains."""
    from PIL import Image

    from fewstep.testing import run_tiny, tiny_family_teacher, tiny_run_config

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher, _ = tiny_family_teacher("sdxl", tmp_path / "families")
    folder = tmp_path / "aspect"
    folder.mkdir()
    rows = []
    for i in range(16):
        w, h = [(40, 44), (64, 36)][i % 2]  # nearly square and wide originals
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = tiny_run_config(teacher, {"name": "cd"}, steps=2, batch=4,
                             data={"source": str(folder), "limit": None, "buckets": [[32, 32], [24, 40]]})
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert isinstance(trainer.dataset, CachedDataset) and len(rec.logs) == 2
    shapes = set()
    for step in range(4):
        trainer.state.nimg = 4 * step
        batch = trainer.batch(0)
        h, w = (2 * s for s in batch.x0.shape[-2:])  # the tiny SDXL VAE downsamples by 2
        shapes.add((h, w))
        # 44x40 -> 35x32, centre crop from row 1; 36x64 -> 24x43, from column 1
        expected = [[44, 40, 1, 0, 32, 32]] * 4 if (h, w) == (32, 32) else [[36, 64, 0, 1, 24, 40]] * 4
        assert batch.cond.added.tolist() == expected and batch.uncond.added.tolist() == expected
    assert shapes == {(32, 32), (24, 40)}
