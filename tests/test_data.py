"""fewstep.data: every source kind round-trips known values; errors name the problem; the stream replays."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from fewstep.data import DataConfig, IndexStream, LatentDataset, build_dataset, digits_array, encode_latents


@pytest.fixture(scope="module")
def digits():
    return build_dataset(DataConfig())


def _write_idx(path: Path, magic: int, array: np.ndarray, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


# --- digits ---------------------------------------------------------------------------------------


def test_digits_native(digits):
    raw, labels = digits_array()
    assert digits.shape == (1, 8, 8) and len(digits) == 1797 and digits.num_classes == 10
    assert digits.images.dtype == torch.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    torch.testing.assert_close(digits.images[:, 0], torch.from_numpy(raw).float() / 8 - 1)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert digits.describe() == "digits: 1797 images 1x8x8, 10 classes"


def test_digits_labels_only_when_class_conditional(digits):
    idx = torch.tensor([0, 5, 1796])
    x, labels, prompts = digits.get(idx)
    assert x.shape == (3, 1, 8, 8) and labels is None and prompts is None
    cond = build_dataset(DataConfig(class_conditional=True, limit=10))
    _, labels, _ = cond.get(torch.arange(10))
    assert labels.dtype == torch.int64
    assert labels.tolist() == digits_array()[1][:10].tolist()


def test_digits_resolution_and_channels():
    ds = build_dataset(DataConfig(resolution=16, channels=3, limit=7))
    assert ds.shape == (3, 16, 16) and len(ds) == 7
    assert ds.describe() == "digits: 7 images 3x16x16, 10 classes"
    x, _, _ = ds.get(torch.arange(7))
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])  # gray repeated into RGB
    full = build_dataset(DataConfig(resolution=16))
    assert full.images.shape == (1797, 1, 16, 16)


def test_flip_mask_mirrors_selected_images(digits):
    idx = torch.tensor([3, 4])
    x, _, _ = digits.get(idx, flip=torch.tensor([True, False]))
    torch.testing.assert_close(x[0], digits.images[3].flip(-1))
    torch.testing.assert_close(x[1], digits.images[4])


def test_config_rejects_unknown_and_out_of_range():
    with pytest.raises(ValidationError):
        DataConfig(resolutoin=16)
    with pytest.raises(ValidationError):
        DataConfig(resolution=0)
    with pytest.raises(ValidationError):
        DataConfig(channels=2)


# --- idx ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_with_sibling_labels(tmp_path, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4
    images[0, 0, 0], images[1, 0, 0] = 0, 255
    labels = np.array([7, 0, 3], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", 0x803, images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", 0x801, labels, gz)
    ds = build_dataset(
        DataConfig(source=f"train-images-idx3-ubyte{suffix}", class_conditional=True), base_dir=tmp_path
    )
    assert ds.shape == (1, 4, 5) and ds.num_classes == 8
    x, y, _ = ds.get(torch.arange(3))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    assert x[0, 0, 0, 0] == -1.0 and x[1, 0, 0, 0] == 1.0
    assert y.tolist() == [7, 0, 3]


def test_idx_explicit_labels_and_missing_labels(tmp_path):
    _write_idx(tmp_path / "imgs.idx", 0x803, np.zeros((2, 3, 3)), gz=False)
    _write_idx(tmp_path / "lab.idx", 0x801, np.array([1, 2]), gz=False)
    ds = build_dataset(
        DataConfig(source="imgs.idx", labels="lab.idx", class_conditional=True), base_dir=tmp_path
    )
    assert ds.labels.tolist() == [1, 2]
    assert build_dataset(DataConfig(source="imgs.idx"), base_dir=tmp_path).labels is None
    with pytest.raises(ValueError, match="no labels.*data.labels"):
        build_dataset(DataConfig(source="imgs.idx", class_conditional=True), base_dir=tmp_path)


def test_idx_bad_magic_and_truncation(tmp_path):
    _write_idx(tmp_path / "bad-images-idx3-ubyte", 0x804, np.zeros((2, 3, 3)), gz=False)
    _write_idx(tmp_path / "labels", 0x801, np.zeros(2), gz=True)
    _write_idx(tmp_path / "ok-images-idx3-ubyte", 0x803, np.zeros((2, 3, 3)), gz=False)
    _write_idx(tmp_path / "ok-labels-idx1-ubyte", 0x803, np.zeros((2, 3, 3)), gz=False)
    with pytest.raises(ValueError, match="cannot tell what"):
        build_dataset(DataConfig(source="bad-images-idx3-ubyte"), base_dir=tmp_path)
    with pytest.raises(ValueError, match="idx labels file; give the images file"):
        build_dataset(DataConfig(source="labels"), base_dir=tmp_path)
    with pytest.raises(ValueError, match="magic number 0x00000803, expected 0x00000801"):
        build_dataset(DataConfig(source="ok-images-idx3-ubyte"), base_dir=tmp_path)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes((tmp_path / "ok-images-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        build_dataset(DataConfig(source="short.idx"), base_dir=tmp_path)


# --- npz ------------------------------------------------------------------------------------------


def test_npz_auto_keys_and_overrides(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(
        tmp_path / "d.npz", x_train=x, y_train=np.arange(6) % 3, x_test=x[:2] // 2, y_test=np.array([5, 5])
    )
    ds = build_dataset(DataConfig(source="d.npz", class_conditional=True), base_dir=tmp_path)
    assert ds.shape == (1, 4, 4) and ds.num_classes == 3
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(x).float() / 127.5 - 1)
    test = build_dataset(
        DataConfig(source="d.npz", images_key="x_test", labels_key="y_test"), base_dir=tmp_path
    )
    assert len(test) == 2 and test.labels.tolist() == [5, 5] and test.num_classes == 6


def test_npz_layouts_and_float_range(tmp_path):
    rgb = np.random.default_rng(1).random((2, 5, 6, 3), dtype=np.float32)  # NHWC floats in [0, 1]
    np.savez(tmp_path / "rgb.npz", images=rgb)
    ds = build_dataset(DataConfig(source="rgb.npz", channels=1), base_dir=tmp_path)
    assert ds.shape == (1, 5, 6)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(luma) * 2 - 1)
    np.savez(tmp_path / "neg.npz", x=rgb * 2 - 1)
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        build_dataset(DataConfig(source="neg.npz"), base_dir=tmp_path)


def test_npz_missing_keys_list_available(tmp_path):
    np.savez(tmp_path / "d.npz", pixels=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(KeyError, match=r"available keys: \['pixels', 'y'\].*images_key"):
        build_dataset(DataConfig(source="d.npz"), base_dir=tmp_path)
    with pytest.raises(KeyError, match=r"'targets' is not in .*available keys"):
        build_dataset(
            DataConfig(source="d.npz", images_key="pixels", labels_key="targets"), base_dir=tmp_path
        )
    ds = build_dataset(DataConfig(source="d.npz", images_key="pixels"), base_dir=tmp_path)
    assert ds.labels.tolist() == [0, 0]


def test_npz_without_labels_class_conditional_fails(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="class_conditional is true but the source 'u.npz' has no labels"):
        build_dataset(DataConfig(source="u.npz", class_conditional=True), base_dir=tmp_path)


# --- image folders --------------------------------------------------------------------------------


def _png(path: Path, value: int, size: tuple[int, int] = (6, 4), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_folder_class_subfolders_sorted(tmp_path):
    _png(tmp_path / "imgs/zebra/a.png", 255)
    _png(tmp_path / "imgs/cat/b.png", 0)
    _png(tmp_path / "imgs/cat/a.png", 51)
    (tmp_path / "imgs/cat/notes.txt").write_text("ignored")
    ds = build_dataset(DataConfig(source="imgs", class_conditional=True), base_dir=tmp_path)
    assert ds.class_names == ["cat", "zebra"] and ds.num_classes == 2
    assert ds.shape == (1, 4, 6)  # PIL size is (W, H)
    x, y, _ = ds.get(torch.arange(3))
    assert y.tolist() == [0, 0, 1]
    assert x[:, 0, 0, 0].tolist() == pytest.approx([51 / 127.5 - 1, -1.0, 1.0])


def test_folder_flat_mixed_modes_and_sizes(tmp_path):
    _png(tmp_path / "flat/1.png", 10, mode="L")
    _png(tmp_path / "flat/2.png", 200, size=(8, 8), mode="RGB")
    with pytest.raises(ValueError, match="differ in size.*data.resolution"):
        build_dataset(DataConfig(source="flat"), base_dir=tmp_path)
    ds = build_dataset(DataConfig(source="flat", resolution=4), base_dir=tmp_path)
    assert ds.shape == (3, 4, 4) and ds.labels is None and ds.class_names is None
    x = ds.images
    assert torch.allclose(x[1, 0], torch.tensor(200 / 127.5 - 1)) and torch.allclose(
        x[1, 2], torch.tensor(1.0)
    )
    with pytest.raises(ValueError, match="no labels"):
        build_dataset(DataConfig(source="flat", resolution=4, class_conditional=True), base_dir=tmp_path)


# --- prompts --------------------------------------------------------------------------------------


def test_prompt_only_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n\n  a blue dog  \n")
    (tmp_path / "p.json").write_text(json.dumps(["one", "two", "three"]))
    txt = build_dataset(DataConfig(source="p.txt"), base_dir=tmp_path)
    assert not txt.has_images and txt.shape is None and len(txt) == 2
    assert txt.get(torch.tensor([1, 0])) == (None, None, ("a blue dog", "a red cat"))
    assert txt.describe() == "p.txt: 2 prompts"
    js = build_dataset(DataConfig(source="p.json", limit=2), base_dir=tmp_path)
    assert js.prompts == ("one", "two")
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list of strings"):
        build_dataset(DataConfig(source="bad.json"), base_dir=tmp_path)
    with pytest.raises(ValueError, match="has no labels"):
        build_dataset(DataConfig(source="p.txt", class_conditional=True), base_dir=tmp_path)
    with pytest.raises(ValueError, match="encode_latents: 'p.txt' is a prompt-only source"):
        encode_latents(txt, lambda x: x)


def test_prompts_paired_with_images(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2, 2), np.uint8))
    (tmp_path / "p.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "short.txt").write_text("a\nb\n")
    ds = build_dataset(DataConfig(source="d.npz", prompts="p.json", limit=2), base_dir=tmp_path)
    assert ds.get(torch.tensor([1]))[2] == ("b",) and len(ds) == 2
    with pytest.raises(ValueError, match="holds 2 prompts but data.source holds 3 images"):
        build_dataset(DataConfig(source="d.npz", prompts="short.txt"), base_dir=tmp_path)


# --- paths and misplaced options ------------------------------------------------------------------


def test_missing_path_names_resolved_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(DataConfig(source="nowhere/data.npz"), base_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "nowhere/data.npz") in message and f"relative to {tmp_path}" in message
    assert "image folder" in message


def test_options_for_another_source_are_rejected():
    with pytest.raises(ValueError, match="data.images_key is set but has no meaning for the digits source"):
        build_dataset(DataConfig(images_key="x"))


# --- IndexStream ----------------------------------------------------------------------------------


def test_index_stream_epochs_are_permutations():
    stream = IndexStream(n=7, seed=3)
    first = stream.indices(0, 21)
    assert first.dtype == torch.int64 and first.shape == (21,)
    for e in range(3):
        assert sorted(first[7 * e : 7 * e + 7].tolist()) == list(range(7))
    assert not torch.equal(first[:7], first[7:14])  # epochs are reshuffled
    assert torch.equal(first, IndexStream(7, 3).indices(0, 21))
    assert not torch.equal(first, IndexStream(7, 4).indices(0, 21))


def test_index_stream_resumes_exactly():
    stream = IndexStream(n=10, seed=0)
    assert torch.equal(torch.cat([stream.indices(0, 10), stream.indices(10, 10)]), stream.indices(0, 20))
    assert torch.equal(stream.indices(5, 13), stream.indices(0, 30)[5:18])  # crosses the epoch boundary
    assert torch.equal(IndexStream(10, 0).indices(95, 3), stream.indices(0, 100)[95:98])
    assert stream.indices(4, 0).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        IndexStream(0, 0)


def test_index_stream_flips():
    stream = IndexStream(n=5, seed=1)
    flips = stream.flips(0, 10000)
    assert flips.dtype == torch.bool and 0.45 < flips.float().mean() < 0.55
    assert torch.equal(stream.flips(4090, 20), flips[4090:4110])  # crosses a block boundary
    assert torch.equal(IndexStream(99, 1).flips(0, 100), flips[:100])  # depends on (seed, position) only
    assert not torch.equal(IndexStream(5, 2).flips(0, 100), flips[:100])


# --- latents --------------------------------------------------------------------------------------


class _CountingEncoder:
    """(B, 1, 8, 8) -> (B, 2, 4, 4): average-pool and a scaled copy, counting the images it sees."""

    def __init__(self, scale: float = 1.0) -> None:
        self.images = 0
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        z = torch.nn.functional.avg_pool2d(x, 2)
        return torch.cat([z, z * self.scale], dim=1)


def test_encode_latents_and_cache(tmp_path):
    ds = build_dataset(DataConfig(limit=50, class_conditional=True))
    cache = tmp_path / "cache" / "latents.safetensors"
    enc = _CountingEncoder()
    lat = encode_latents(ds, enc, batch_size=16, cache_path=cache, fingerprint="vae-a")
    assert isinstance(lat, LatentDataset) and enc.images == 50 and cache.exists()
    assert lat.shape == (2, 4, 4) and lat.data_shape == (1, 8, 8) and len(lat) == 50
    assert lat.describe() == "digits: 50 images 1x8x8, 10 classes; latents 2x4x4"
    assert [p.name for p in cache.parent.iterdir()] == ["latents.safetensors"]  # no temporary left behind
    torch.testing.assert_close(lat.images[:, :1], torch.nn.functional.avg_pool2d(ds.images, 2))

    again = _CountingEncoder()
    hit = encode_latents(ds, again, cache_path=cache, fingerprint="vae-a")
    assert again.images == 0 and torch.equal(hit.images, lat.images)

    other = _CountingEncoder(scale=2.0)
    miss = encode_latents(ds, other, cache_path=cache, fingerprint="vae-b")
    assert other.images == 50 and torch.equal(miss.images[:, 1], 2 * lat.images[:, 1])
    assert encode_latents(ds, _CountingEncoder(), cache_path=cache, fingerprint="vae-b").images.equal(
        miss.images
    )


def test_latent_dataset_get_flips_latents_and_keeps_labels():
    ds = build_dataset(DataConfig(limit=4, class_conditional=True))
    lat = encode_latents(ds, _CountingEncoder())
    z, y, _ = lat.get(torch.tensor([2, 3]), flip=torch.tensor([True, False]))
    torch.testing.assert_close(z[0], lat.images[2].flip(-1))
    assert y.tolist() == ds.labels[2:4].tolist()
    with pytest.raises(ValueError, match="must return \\(B, c, h, w\\)"):
        encode_latents(ds, lambda x: x.flatten(1))
