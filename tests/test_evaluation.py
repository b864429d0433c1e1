"""Fréchet distance and precision/recall against closed forms."""

import numpy as np
import pytest

from fewstep.evaluation import FeatureStats, frechet_distance, precision_recall


def test_identical_sets_give_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    s = FeatureStats.of(f)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_gaussians_with_diagonal_covariance_match_the_closed_form():
    # For diagonal covariances the distance is ||dmu||^2 + sum (std_a - std_b)^2.
    d = 8
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    std_a, std_b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    a = FeatureStats(mu_a, np.diag(std_a**2), 0)
    b = FeatureStats(mu_b, np.diag(std_b**2), 0)
    expected = ((mu_a - mu_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_full_covariance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    m = rng.normal(size=(6, 6))
    n = rng.normal(size=(6, 6))
    sa, sb = m @ m.T + 0.1 * np.eye(6), n @ n.T + 0.1 * np.eye(6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert frechet_distance(FeatureStats(mu_a, sa, 0), FeatureStats(mu_b, sb, 0)) == pytest.approx(ref, rel=1e-8)


def test_shifted_samples_approach_the_shift():
    rng = np.random.default_rng(3)
    shift = np.full(4, 0.5)
    a = FeatureStats.of(rng.normal(size=(20000, 4)))
    b = FeatureStats.of(rng.normal(size=(20000, 4)) + shift)
    assert frechet_distance(a, b) == pytest.approx((shift**2).sum(), abs=0.02)


def test_precision_recall_extremes_and_mode_dropping():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 2))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = real[real[:, 0] > 0]  # a generator that dropped half the modes: precise, low recall
    p, r = precision_recall(real, half)
    assert p == 1.0 and r < 0.7


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureStats.of(np.zeros(5))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(FeatureStats.of(np.zeros((3, 2))), FeatureStats.of(np.zeros((3, 4))))
