"""Fixtures for the training tests: tiny real shards, one local Ray for the session, params from the
committed cpu-tiny profile, and a real PostgreSQL-backed MLflow server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from components.params import deep_merge, read_params, resolve_profile
from components.train_params import TrainParams

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_params(**overrides) -> TrainParams:
    """params.yaml's train section under the cpu-tiny profile, deep-merged with ``overrides``."""
    section = dict(read_params(REPO / "params.yaml")["train"], profile="cpu-tiny")
    return TrainParams.model_validate(deep_merge(resolve_profile(section, "train"), overrides))


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """prepare -> validate -> shard on 200 MNIST digits (the real stages), once per session."""
    from components import prepare, shard, validate

    root = tmp_path_factory.mktemp("train-data")
    prepare.prepare(prepare.PrepareParams(limit=200), root / "prepared")
    validate.validate(validate.ValidateParams(min_train_per_class=5), root / "prepared", root / "validated")
    shard.shard(shard.ShardParams(shard_size=40), root / "prepared", root / "validated", root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for every training test (starting it costs ~5 s)."""
    from components.train import start_local_ray

    start_local_ray(num_cpus=2, object_store_mb=200)
    import ray

    yield ray
    ray.shutdown()


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def _as_postgres(*cmd: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *cmd], check=True, capture_output=True)


@pytest.fixture(scope="session")
def mlflow_server():
    """``mlflow server`` backed by a throw-away PostgreSQL cluster; yields the tracking URI."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="tim-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: hand the folder to its own user
        shutil.chown(root, "postgres", "postgres")
    data, pg_port, port = root / "data", free_port(), free_port()
    _as_postgres("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
    _as_postgres("pg_ctl", "-D", str(data), "-w", "-l", str(root / "pg.log"), "start",
                 "-o", f"-p {pg_port} -k {root} -c listen_addresses=127.0.0.1")
    server = None
    try:
        _as_postgres("createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow",
             "--artifacts-destination", str(root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(root / "mlflow.log", "wb"))
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", server, timeout_s=90)
        yield uri
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        _as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
