"""Per-sample distances shared by the methods; each returns (B,)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.method_configs import Distance


def pseudo_huber_c(x: Tensor) -> float:
    """iCT's constant c = 0.00054 * sqrt(D), D the per-sample data dimension (iCT §3.3)."""
    return 0.00054 * math.sqrt(x[0].numel())


def distance(a: Tensor, b: Tensor, kind: Distance = "l2", c: float | None = None) -> Tensor:
    """Distance between two batches (B, ...) -> (B,).

    l2: mean squared error per sample. l1: mean absolute error per sample.
    pseudo_huber: sqrt(||a - b||^2 + c^2) - c with the norm over the whole sample (iCT Eq. 8); c
    defaults to :func:`pseudo_huber_c`. (LPIPS needs downloaded VGG weights, so it is not offered.)
    """
    diff = (a - b).flatten(1).float()
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo_huber":
        c = pseudo_huber_c(a) if c is None else c
        return torch.sqrt(diff.square().sum(1) + c * c) - c
    raise ValueError(f"unknown distance {kind!r}; choose one of: l2, l1, pseudo_huber")
