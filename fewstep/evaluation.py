"""Distribution metrics on feature vectors: Fréchet distance (FID's formula) and k-NN precision /
recall (Kynkäänniemi et al. 2019).

Only the maths lives here so far; the Inception feature extractor, reference-statistics caching and
`fewstep eval` come with the evaluation issue (issue 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, in float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @staticmethod
    def of(features: np.ndarray) -> FeatureStats:
        """features: (N, D), N >= 2. Covariance with the unbiased (N - 1) normalisation, as FID uses."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
        return FeatureStats(f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), f.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, Eq. 6).

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum; it needs no general matrix square
    root and stays real for singular (rank-deficient) covariances.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(sq, 0.0, None))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-3), k = 3 as in the paper.

    precision: fraction of fake features inside the union of k-NN balls of the real features;
    recall: fraction of real features inside the union of k-NN balls of the fake features.
    Memory is O(N^2): meant for the few thousand samples of a benchmark.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {len(real)} real and {len(fake)} fake")

    def coverage(manifold: np.ndarray, probes: np.ndarray) -> float:
        radii = _knn_radii(manifold, k)
        return float((_pairwise(probes, manifold) <= radii[None, :]).any(1).mean())

    return coverage(real, fake), coverage(fake, real)
