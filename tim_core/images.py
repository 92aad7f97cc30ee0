"""Model outputs as pictures: the one conversion from the network's [-1, 1] range to 8-bit pixels, shared by the
training grids, the evaluation pictures and the served model (which ships tim_core alone)."""

from __future__ import annotations

import numpy as np

__all__ = ["to_uint8", "image_grid"]


def to_uint8(images: np.ndarray, channels_last: bool = True) -> np.ndarray:
    """[..., C, H, W] floats in [-1, 1] -> uint8 in [0, 255] (as [..., H, W, C] unless ``channels_last`` is False)."""
    pixels = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return np.moveaxis(pixels, -3, -1) if channels_last else pixels


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> one uint8 picture [h, w] (one channel) or [h, w, C]: ``rows`` rows of
    N / rows tiles with 1 px gaps."""
    n, c, h, w = images.shape
    cols = n // rows
    tiles = to_uint8(images)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = tiles[i]
    return grid[..., 0] if c == 1 else grid
