"""Real services for the tests, started on 127.0.0.1 and stopped afterwards: a throw-away PostgreSQL cluster
with an `mlflow server` on it. Plain helpers; the session fixtures that use them are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

BIN = Path(sys.executable).parent  # the venv's scripts: mlflow, tim, dvc, moto_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail early if the process died."""
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


def _pg_tool(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it (not on PATH by default)."""
    found = shutil.which(name)
    if found is None:
        versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(versions[-1]) if versions else None
    return found


def _as_postgres(tool: str, *args: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, _pg_tool(tool) or tool, *args], check=True, capture_output=True)


def postgres_available() -> bool:
    return all(_pg_tool(name) for name in ("initdb", "pg_ctl", "createdb"))


@contextlib.contextmanager
def mlflow_on_postgres() -> Iterator[str]:
    """``mlflow server`` backed by a fresh PostgreSQL cluster in a temporary folder; yields the tracking URI."""
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
        wait_http(f"{uri}/health", server, timeout_s=90)
        yield uri
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        _as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
