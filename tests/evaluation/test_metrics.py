"""components/metrics.py against closed forms and independent references (scipy's sqrtm, brute force)."""

import numpy as np
import pytest
import scipy.linalg

from components.evaluation import metrics


def gaussian(n, d=8, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large():
    x = gaussian(500)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(x, gaussian(500, seed=1, shift=3.0) * 2) > 50


def test_fid_is_symmetric_and_ignores_sample_order():
    x, y = gaussian(300), gaussian(400, seed=1, shift=0.5)
    assert metrics.frechet_distance(x, y) == pytest.approx(metrics.frechet_distance(y, x), rel=1e-9)
    perm = np.random.default_rng(2).permutation(len(y))
    assert metrics.frechet_distance(x, y[perm]) == pytest.approx(metrics.frechet_distance(x, y), rel=1e-9)


def test_fid_of_diagonal_gaussians_has_its_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + np.eye(6), m2 @ m2.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert metrics.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_kid_of_point_masses_is_the_kernel_closed_form():
    # Kernel (x.y/d + 1)^3 in d = 1: k(0,0) = 1, k(1,1) = 8, k(0,1) = 1, so MMD^2 = 1 + 8 - 2 = 7.
    mean, std = metrics.kid(np.zeros((10, 1)), np.ones((12, 1)), subset_size=10, num_subsets=5)
    assert mean == pytest.approx(7.0) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_matches_brute_force_unbiased_mmd_and_is_near_zero_for_one_distribution():
    x, y = gaussian(30, d=4), gaussian(30, d=4, seed=1, shift=1.0)
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(30) for j in range(30) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(30) for j in range(30) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(30) for j in range(30)])
    assert metrics.kid(x, y)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    same, _ = metrics.kid(gaussian(2000, d=4), gaussian(2000, d=4, seed=5), subset_size=500, num_subsets=10)
    assert abs(same) < 0.02 < metrics.kid(x, y)[0]


def test_precision_recall_closed_form_on_a_line():
    real = np.arange(10.0)[:, None]          # k = 1: every real ball has radius 1
    fake = np.array([[0.5], [100.0]])         # one fake inside the real manifold, one far out
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == 0.5                   # 0.5 lies in a real ball, 100 in none
    assert recall == 1.0                      # each fake ball has radius 99.5 and covers all real points


def test_precision_recall_identical_and_disjoint_sets():
    x = gaussian(200)
    assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(x, gaussian(200, seed=1, shift=100.0)) == (0.0, 0.0)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="features"):
        metrics.frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_recall(gaussian(5), gaussian(5), k=5)
