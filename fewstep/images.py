"""Turning (N, C, H, W) tensors in [-1, 1] into PNG files: grids, labelled comparison rows, single images.

Every file is written atomically (to a temporary name, then ``os.replace``), so a reader never sees
half a PNG, e.g. a dashboard polling the run folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["make_grid", "save_grid", "save_grid_rows", "save_images", "to_uint8"]

_LABEL_MARGIN = 6  # pixels of white around a row label in save_grid_rows


def to_uint8(x: Tensor) -> np.ndarray:
    """x: (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clamped and rounded (-1 -> 0, 1 -> 255)."""
    x = x.detach().to("cpu", torch.float32)
    return ((x + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(x: Tensor, nrow: int, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile x: (N, C, H, W) into one image (C, H', W') with ``nrow`` images per row.

    H' = rows * (H + padding) + padding and W' = min(nrow, N) * (W + padding) + padding, where
    rows = ceil(N / nrow) (torchvision's layout); gaps are filled with ``pad_value`` (1.0: white).
    """
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"make_grid: expected a non-empty (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"make_grid: nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = x.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        top = (i // cols) * (h + padding) + padding
        left = (i % cols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def save_grid(x: Tensor, path: Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save x: (N, C, H, W) in [-1, 1] (C = 1 gray, C = 3 RGB) as one PNG grid; returns ``path``.

    nrow: images per row, default ceil(sqrt(N)) (a square-ish grid). upscale: integer nearest-neighbour
    magnification, for tiny images such as 8x8 digits.
    """
    grid = make_grid(x, nrow or math.ceil(math.sqrt(x.shape[0])))
    _write_png(_upscale(_to_pil(grid), upscale), Path(path))
    return Path(path)


def save_grid_rows(rows: dict[str, Tensor], path: Path, upscale: int = 1) -> Path:
    """Save one labelled row per entry, e.g. {"teacher 32 steps": x, "student 1 step": y}; returns ``path``.

    Every value is (N, C, H, W) in [-1, 1] with the same shape, so that columns line up (same noise,
    different samplers). The label is drawn to the left of its row with PIL's default font.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("save_grid_rows: no rows given; pass a dict {label: (N, C, H, W) tensor}")
    shapes = {label: tuple(x.shape) for label, x in rows.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"save_grid_rows: every row must have the same (N, C, H, W) shape, got {shapes}")
    strips = [_upscale(_to_pil(make_grid(x, nrow=x.shape[0])), upscale) for x in rows.values()]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), label, font=font) for label in rows]
    label_w = max(right for _, _, right, _ in boxes) + 2 * _LABEL_MARGIN
    strip_w, strip_h = strips[0].size
    row_h = max(strip_h, max(bottom for _, _, _, bottom in boxes) + 2 * _LABEL_MARGIN)
    canvas = Image.new(strips[0].mode, (label_w + strip_w, row_h * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, strip, box) in enumerate(zip(rows, strips, boxes)):
        canvas.paste(strip, (label_w, r * row_h))
        draw.text((_LABEL_MARGIN, r * row_h + (row_h - box[3]) // 2), label, fill="black", font=font)
    _write_png(canvas, Path(path))
    return Path(path)


def save_images(x: Tensor, folder: Path, prefix: str = "") -> list[Path]:
    """Save each image of x: (N, C, H, W) in [-1, 1] as ``folder/{prefix}{i:06d}.png``; returns the paths."""
    folder = Path(folder)
    paths = []
    for i, img in enumerate(_pil_images(x)):
        paths.append(folder / f"{prefix}{i:06d}.png")
        _write_png(img, paths[-1])
    return paths


def _pil_images(x: Tensor) -> list[Image]:
    from PIL import Image

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"images: expected (N, C, H, W) with C = 1 (gray) or 3 (RGB), got shape {tuple(x.shape)}; "
            "decode latents to pixels before saving"
        )
    arrays = to_uint8(x)
    return [
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays
    ]  # (H, W) -> "L", (H, W, 3) -> "RGB"


def _to_pil(img: Tensor) -> Image:
    """img: (C, H, W) in [-1, 1] -> a gray (C = 1) or RGB (C = 3) PIL image."""
    return _pil_images(img[None])[0]


def _upscale(img: Image, factor: int) -> Image:
    from PIL import Image

    if factor < 1:
        raise ValueError(f"images: upscale must be an integer >= 1, got {factor}")
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


def _write_png(img: Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
