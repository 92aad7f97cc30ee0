"""Where MLflow is, one rule for every stage: ``mlflow.tracking_uri`` in params.yaml (or ``--set``), else the
``MLFLOW_TRACKING_URI`` environment variable, else the embedded store ``sqlite:///<project>/mlruns.db`` with its
artifacts in ``<project>/mlartifacts``. The registry lives in the same store. Also: checking that the store
answers before any work, and the lineage every run records (git commit, flattened params)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field

from components.common.errors import Unreachable, UserError
from components.common.params import StageParams

EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


class MlflowParams(StageParams):
    """params.yaml's ``mlflow`` section, read by every stage that talks to MLflow."""

    tracking_uri: str | None = None  # null: MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns.db
    probe_timeout_s: float = Field(5.0, gt=0)


def sqlite_file(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI, as SQLAlchemy reads it: ``sqlite:///mlruns.db`` is relative to
    the working directory, ``sqlite:////abs/mlruns.db`` absolute (urlparse would make both absolute)."""
    return Path(uri[len("sqlite:///"):])


def probe_tcp(host: str, port: int, timeout_s: float, what: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise Unreachable(f"{what} at {host}:{port} is unreachable: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Tracking:
    """The resolved MLflow store of a command."""

    uri: str
    probe_timeout_s: float = 5.0

    @classmethod
    def resolve(cls, params: MlflowParams, project_dir: str | Path) -> Tracking:
        uri = params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = f"sqlite:///{(Path(project_dir) / EMBEDDED_DB).resolve()}"
        elif uri.startswith("sqlite:///"):
            uri = f"sqlite:///{sqlite_file(uri).resolve()}"  # one spelling per file, whatever the working folder
        return cls(uri, params.probe_timeout_s)

    @property
    def embedded(self) -> bool:
        return self.uri.startswith("sqlite:///")

    def check(self, must_exist: bool = False) -> None:
        """Fail fast when the store does not answer. An embedded store is created on first use, unless
        ``must_exist``: a registry command on a missing file means a wrong path, which a new empty store hides."""
        parsed = urlparse(self.uri)
        if self.embedded:
            db = sqlite_file(self.uri)
            if must_exist and not db.is_file():
                raise UserError(f"no MLflow store at {db} ({self.uri}); train first, or point mlflow.tracking_uri "
                                "or MLFLOW_TRACKING_URI at your store")
            db.parent.mkdir(parents=True, exist_ok=True)
        elif parsed.scheme in ("http", "https"):
            import requests

            health = self.uri.rstrip("/") + "/health"
            try:
                response = requests.get(health, timeout=self.probe_timeout_s)
            except requests.RequestException as exc:
                raise Unreachable(
                    f"MLflow tracking server {self.uri} is unreachable ({type(exc).__name__}); start it, or unset "
                    "MLFLOW_TRACKING_URI / mlflow.tracking_uri to use the local sqlite store") from None
            if response.status_code != 200:
                raise Unreachable(f"MLflow tracking server {self.uri}: {health} answered HTTP {response.status_code}")
        elif parsed.hostname:
            # A database URI (postgresql://...): check the port answers instead of waiting on a driver timeout.
            probe_tcp(parsed.hostname, parsed.port or 5432, self.probe_timeout_s,
                      what=f"MLflow store {parsed.scheme}://")

    def client(self, must_exist: bool = False):
        """An MlflowClient for tracking and the registry, after :meth:`check`."""
        self.check(must_exist)
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @contextmanager
    def active(self) -> Iterator[None]:
        """MLflow's process-wide tracking and registry URI set to this store inside the block (fluent calls such as
        ``mlflow.pyfunc.log_model`` know no other), then put back exactly as they were, environment included:
        a stage called as a library must not redirect its caller's later runs."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_state
        from mlflow.tracking._tracking_service import utils as tracking_state

        env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved = tracking_state._tracking_uri, registry_state._registry_uri  # None = "not set", unlike the getters
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: beside the embedded database (MLflow's default is relative to
        the working folder); the server's own choice otherwise."""
        if not self.embedded:
            return None
        return (sqlite_file(self.uri).parent / EMBEDDED_ARTIFACTS).resolve().as_uri()

    def same_store(self, recorded: str | None, what: str) -> None:
        """A run recorded in another store than this command resolves is an error, not a silent switch."""
        if recorded and Tracking.resolve(MlflowParams(tracking_uri=recorded), Path.cwd()).uri != self.uri:
            raise UserError(f"{what} was tracked at {recorded}, but this command uses {self.uri} (mlflow.tracking_uri, "
                            "else MLFLOW_TRACKING_URI, else the project's mlruns.db): point it at the same store")


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


def git_commit(project_dir: Path) -> tuple[str, bool]:
    """(commit, dirty) of the code that runs; ("unknown", False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())
