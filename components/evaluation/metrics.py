"""Sample-quality metrics on feature vectors, pure numpy/torch: Frechet distance, kernel inception distance
(unbiased polynomial-kernel MMD) and k-NN precision/recall (Kynkaanniemi et al. 2019).

Every function takes two [N, D] feature arrays: ``real`` (the reference set) and ``fake`` (the generated one).
The feature network is someone else's concern (components/evaluator.py, or Inception when its weights exist).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["frechet_distance", "fid_from_stats", "kid", "precision_recall", "feature_stats"]


def _as2d(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, D] features; got shape {a.shape}")
    return a


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    f = _as2d(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    Tr((S1 S2)^1/2) is computed as Tr((S1^1/2 S2 S1^1/2)^1/2): the same eigenvalues, but the matrix is
    symmetric PSD, so eigh is exact where scipy's sqrtm of the non-symmetric S1 S2 can go complex for
    rank-deficient covariances (fewer samples than feature dimensions).
    """
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def frechet_distance(real: ArrayLike, fake: ArrayLike) -> float:
    """FID-style Frechet distance between Gaussians fitted to the two feature sets."""
    return fid_from_stats(*feature_stats(real), *feature_stats(fake))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The KID paper's kernel: (x.y / d + 1)^3, free of any bandwidth to tune.
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Unbiased: the diagonal k(x_i, x_i) terms are left out of the within-set means.
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: ArrayLike, fake: ArrayLike, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: mean and std of the unbiased MMD^2 over random subsets (without
    replacement inside a subset). With subset_size >= both set sizes it is one exact MMD^2 (std 0)."""
    x, y = _as2d(real, "real"), _as2d(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    size = min(subset_size, len(x), len(y))
    if size == len(x) == len(y):
        return _mmd2_unbiased(x, y), 0.0
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (index k of the sorted row, index 0 is itself)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall: each set's manifold is the union of balls reaching every point's k-th
    nearest neighbour; precision = share of fake points inside the real manifold, recall = share of real
    points inside the fake manifold."""
    x = torch.from_numpy(_as2d(real, "real"))
    y = torch.from_numpy(_as2d(fake, "fake"))
    if k < 1 or k >= min(len(x), len(y)):
        raise ValueError(f"k must be in [1, {min(len(x), len(y)) - 1}] for sets of {len(x)} and {len(y)}; got {k}")
    precision = _inside_any_ball(y, x, _kth_neighbour_radius(x, k, chunk), chunk).double().mean()
    recall = _inside_any_ball(x, y, _kth_neighbour_radius(y, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
