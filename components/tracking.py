"""MLflow side of training: where to track, checking the server is there, the run's identity and lineage.

The driver owns the run (creates or resumes it, logs params, lineage tags and the final model); rank 0
of the Ray workers attaches to it to log per-step metrics, system metrics and sample grids.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from components.errors import TimError

EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
IDENTITY_TAG = "tim.train.identity"


class Unreachable(TimError):
    """A server the stage needs (MLflow tracking, a database, a Ray cluster) does not answer."""


def resolve_tracking_uri(configured: str | None, project_dir: Path) -> str:
    """params entry, else MLFLOW_TRACKING_URI, else a SQLite file inside the project."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(project_dir / EMBEDDED_DB).resolve()}"


def sqlite_file(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI, as SQLAlchemy reads it: ``sqlite:///mlruns.db`` is relative to
    the working directory, ``sqlite:////abs/mlruns.db`` absolute (urlparse would make both absolute)."""
    return Path(uri[len("sqlite:///"):])


def probe_tracking_uri(uri: str, timeout_s: float) -> None:
    """Fail fast, before any training, when the tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        health = uri.rstrip("/") + "/health"
        try:
            response = requests.get(health, timeout=timeout_s)
        except requests.RequestException as exc:
            raise Unreachable(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); start it, or unset "
                "MLFLOW_TRACKING_URI / mlflow.tracking_uri to use the local sqlite store"
            ) from None
        if response.status_code != 200:
            raise Unreachable(f"MLflow tracking server {uri}: {health} answered HTTP {response.status_code}")
    elif parsed.scheme == "sqlite":
        sqlite_file(uri).parent.mkdir(parents=True, exist_ok=True)
    elif parsed.hostname:
        # A database URI (postgresql://...): check the port answers instead of waiting on a driver timeout.
        probe_tcp(parsed.hostname, parsed.port or 5432, timeout_s, what=f"MLflow store {parsed.scheme}://")


def probe_tcp(host: str, port: int, timeout_s: float, what: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise Unreachable(f"{what} at {host}:{port} is unreachable: {exc.strerror or exc}") from None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: dotted keys, JSON values for lists (so they stay readable)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def data_version(shard_dir: Path) -> str:
    """sha256 of the shard index, which lists every shard's own sha256: a content hash of the data."""
    return hashlib.sha256((shard_dir / "index.json").read_bytes()).hexdigest()


def git_commit(project_dir: Path) -> tuple[str, bool]:
    """(commit, dirty) of the code that trains; ("unknown", False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside the embedded database instead of MLflow's cwd-relative default.
        artifact_location = (sqlite_file(tracking_uri).parent / EMBEDDED_ARTIFACTS).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def open_run(tracking_uri: str, experiment: str, identity: str, resume_run_id: str | None,
             params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Resume ``resume_run_id`` if the store still has it, else create a run; returns its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunStatus
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, experiment, tracking_uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return resume_run_id
    run = client.create_run(experiment_id, run_name=f"train-{identity}", tags={IDENTITY_TAG: identity, **tags})
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for start in range(0, len(flat), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=flat[start:start + 100])
    return run.info.run_id


def finish_run(tracking_uri: str, run_id: str, status: str, artifacts: Path | None = None,
               artifact_path: str = "model") -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if artifacts is not None:
        client.log_artifacts(run_id, str(artifacts), artifact_path=artifact_path)
    client.set_terminated(run_id, status=status)


def image_grid(images: np.ndarray, rows: int) -> Image.Image:
    """[N, C, H, W] floats in [-1, 1] -> one PIL image, ``rows`` rows of N / rows tiles, 1 px gaps."""
    n, c, h, w = images.shape
    cols = n // rows
    tiles = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = tiles[i]
    return Image.fromarray(grid[..., 0] if c == 1 else grid)
