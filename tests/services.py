"""Real services for the tests, started on 127.0.0.1 and stopped afterwards: a throw-away PostgreSQL cluster
with an `mlflow server` on it. Plain helpers; the session fixtures that use them are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

BIN = Path(sys.executable).parent  # the venv's scripts: mlflow, tim, dvc, moto_server


# Every subprocess the helpers run gets a limit: a hung initdb or pg_ctl fails the session instead of stalling it.
PG_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def free_port() -> int:
    """A port that was free a moment ago. Another process can take it before ours binds it: servers started
    with it go through ``on_free_port``, which retries with a new port when the bind fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """A server could not bind the port it was given (another process took it after free_port)."""


def on_free_port(start, attempts: int = 3):
    """``start(port)`` with a fresh free port, again (up to ``attempts`` times) while it raises PortTaken."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except PortTaken:
            if attempt == attempts - 1:
                raise


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


def stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started (its process group):
    SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def _pg_tool(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it (not on PATH by default)."""
    found = shutil.which(name)
    if found is None:
        versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(versions[-1]) if versions else None
    return found


def _as_postgres(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, _pg_tool(tool) or tool, *args], check=check, capture_output=True,
                          timeout=PG_TIMEOUT_S)


def postgres_available() -> bool:
    return all(_pg_tool(name) for name in ("initdb", "pg_ctl", "createdb"))


def pg_running(data: Path) -> bool:
    """Whether a PostgreSQL server runs on the cluster in ``data`` (pg_ctl status: 0 running, 3 not)."""
    return _as_postgres("pg_ctl", "-D", str(data), "status", check=False).returncode == 0


def _start_postgres(root: Path, data: Path, port: int) -> int:
    log = root / "pg.log"
    res = _as_postgres("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(log), "start",
                       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", check=False)
    if res.returncode != 0:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if "could not bind" in text or "Address already in use" in text:
            raise PortTaken(f"PostgreSQL could not bind 127.0.0.1:{port}")
        raise RuntimeError(f"pg_ctl start failed ({res.returncode}): {res.stderr.decode(errors='replace')}\n{text}")
    return port


def _start_mlflow(root: Path, backend: str, mlflow: str, port: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = root / f"mlflow-{port}.log"
    with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", server, timeout_s=90)
    except BaseException as e:
        stop(server)
        text = log.read_text(errors="replace")
        if "Address already in use" in text or "address already in use" in text:
            raise PortTaken(f"mlflow server could not bind {uri}") from e
        raise RuntimeError(f"mlflow server did not start: {e}\n{text[-2000:]}") from e
    return server, uri


@contextlib.contextmanager
def mlflow_on_postgres(mlflow: str | None = None, keep_root: list | None = None) -> Iterator[str]:
    """``mlflow server`` backed by a fresh PostgreSQL cluster in a temporary folder; yields the tracking URI.

    Whatever was started is stopped on the way out, also when a later start failed (a failed ``mlflow server``
    start stops the PostgreSQL cluster too). ``mlflow``: the program to start (tests give a broken one);
    ``keep_root``: a list that gets the temporary folder, for tests that check what was left behind."""
    root = Path(tempfile.mkdtemp(prefix="tim-pg-"))
    if keep_root is not None:
        keep_root.append(root)
    data, server, pg_started = root / "data", None, False
    try:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: hand the folder to its own user
            shutil.chown(root, "postgres", "postgres")
        _as_postgres("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        pg_port = on_free_port(lambda port: _start_postgres(root, data, port))
        pg_started = True
        _as_postgres("createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow")
        backend = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow"
        server, uri = on_free_port(lambda port: _start_mlflow(root, backend, mlflow or str(BIN / "mlflow"), port))
        yield uri
    finally:
        try:
            if server is not None:
                stop(server)
        finally:
            if pg_started or (data / "postmaster.pid").exists():
                _as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", check=False)
            shutil.rmtree(root, ignore_errors=True)
