"""fewstep.images: value mapping, grid layout, and PNGs that PIL reads back as written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.images import make_grid, save_grid, save_grid_rows, save_images, to_uint8


def test_to_uint8_endpoints_and_layout():
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, 1 / 127.5 - 1]).view(1, 1, 2, 3)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 1)
    assert out.ravel().tolist() == [0, 255, 128, 0, 255, 1]  # 0.0 -> 127.5 rounds half to even
    rgb = to_uint8(torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)])[None])
    assert rgb.shape == (1, 2, 2, 3) and rgb[0, 0, 0].tolist() == [0, 128, 255]


def test_make_grid_shape_and_padding():
    x = torch.zeros(5, 3, 4, 6)
    grid = make_grid(x, nrow=3, padding=2, pad_value=0.5)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    assert (grid[:, :2] == 0.5).all() and (grid[:, :, :2] == 0.5).all()  # outer border
    assert (grid[:, 2:6, 2:8] == 0).all()  # first image
    assert (grid[:, 8:12, 18:24] == 0.5).all()  # empty sixth cell
    x[4] = -1
    grid = make_grid(x, nrow=3, padding=2)
    assert (grid[:, 8:12, 10:16] == -1).all()  # fifth image: row 1, column 1
    assert make_grid(torch.zeros(2, 1, 3, 3), nrow=8, padding=0).shape == (1, 3, 6)  # columns = min(nrow, N)
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        make_grid(x, nrow=0)


def test_save_grid_reads_back(tmp_path):
    x = torch.linspace(-1, 1, 4 * 8 * 8).view(4, 1, 8, 8)
    path = save_grid(x, tmp_path / "sub" / "grid.png", upscale=3)
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (3 * (2 * 9 + 1), 3 * (2 * 9 + 1))
        a = np.asarray(im)
    assert a[0, 0] == 255 and a[3, 3] == 0  # white padding, then the first pixel (-1) magnified 3x
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    rgb = save_grid(torch.zeros(3, 3, 5, 5), tmp_path / "rgb.png", nrow=3)
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (3 * 6 + 1, 6 + 1)
    with pytest.raises(ValueError, match="C = 1 \\(gray\\) or 3 \\(RGB\\)"):
        save_grid(torch.zeros(1, 4, 5, 5), tmp_path / "latent.png")


def test_save_grid_rows_labels_left_of_rows(tmp_path):
    rows = {"teacher 32 steps": torch.ones(4, 3, 8, 8), "student 1 step": -torch.ones(4, 3, 8, 8)}
    path = save_grid_rows(rows, tmp_path / "rows.png", upscale=2)
    with Image.open(path) as im:
        a = np.asarray(im)
    strip_w, strip_h = 2 * (4 * 9 + 1), 2 * (9 + 1)
    row_h = a.shape[0] // 2
    assert a.ndim == 3 and a.shape[0] == 2 * row_h and row_h >= strip_h and a.shape[1] > strip_w
    assert (a[:, : a.shape[1] - strip_w] < 128).any()  # label text was drawn left of the strips
    assert (a[row_h + 4, -4] == 0).all() and (a[4, -4] == 255).all()  # the second row is the black one
    with pytest.raises(ValueError, match="same \\(N, C, H, W\\) shape"):
        save_grid_rows({"a": torch.zeros(2, 1, 4, 4), "b": torch.zeros(3, 1, 4, 4)}, tmp_path / "bad.png")


def test_save_images_one_png_each(tmp_path):
    x = torch.stack([torch.full((1, 3, 2), v) for v in (-1.0, 1.0)])
    paths = save_images(x, tmp_path / "out", prefix="s_")
    assert [p.name for p in paths] == ["s_000000.png", "s_000001.png"]
    for p, expected in zip(paths, (0, 255)):
        with Image.open(p) as im:
            assert im.size == (2, 3) and np.asarray(im).ravel().tolist() == [expected] * 6
