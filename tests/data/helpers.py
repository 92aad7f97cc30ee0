"""Helpers shared by the data-stage tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.services import BIN, free_port  # noqa: F401  (re-exported for the data tests)

REPO = Path(__file__).resolve().parents[2]


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def make_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class=12, seed=0) -> Path:
    """Class folders with images of mixed sizes, modes and formats, each visibly different."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(18, 40, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            pixels[:, : w // 2, c] = 255  # a class-dependent stripe
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image.convert("L").save(root / name / f"{i:03d}.png")
            elif i % 3 == 1:
                image.save(root / name / f"{i:03d}.jpg", quality=90)
            else:
                image.save(root / name / f"{i:03d}.png")
    return root


def leftovers(parent: Path) -> list[str]:
    """Temporary stage folders (.<name>.tmp-*) that an interrupted/failed stage must not leave."""
    return [p.name for p in parent.glob(".*.tmp-*")]


def env_with_venv() -> dict[str, str]:
    """Environment for subprocesses (tim, dvc) that finds the venv's scripts first."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

