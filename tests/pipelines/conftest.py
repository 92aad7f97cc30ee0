"""Fixtures of the pipeline tests. The moto S3 server and image folders are the data tests' own (reused, not
copied); the run-local project and the Ray head are in the test modules that share them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.data.conftest import aws_env, moto_server  # noqa: F401  (fixtures, reused as they are)
from tests.data.helpers import make_image_folder  # noqa: F401
from tests.services import BIN

REPO = Path(__file__).resolve().parents[2]


def tim(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The `tim` command of this venv, as a user runs it."""
    return subprocess.run([str(BIN / "tim"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})})


def project_copy(root: Path) -> Path:
    """A project folder with this repository's params.yaml (its stores and Ray storage land beside it)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root
