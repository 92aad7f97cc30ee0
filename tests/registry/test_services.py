"""The test services themselves (tests/services.py): a failed start leaves nothing running, and a port taken
between free_port and the server's bind is retried with another port."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from tests.services import (
    PortTaken,
    _as_postgres,
    _start_postgres,
    mlflow_on_postgres,
    on_free_port,
    pg_running,
)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.timeout(180)
def test_a_failed_mlflow_server_start_stops_postgres(tmp_path):
    broken = tmp_path / "mlflow"
    broken.write_text("#!/bin/sh\necho 'mlflow: broken on purpose' >&2\nexit 3\n")
    broken.chmod(0o755)
    roots: list[Path] = []
    with (pytest.raises(RuntimeError, match="mlflow server did not start.*exited with 3"),
          mlflow_on_postgres(mlflow=str(broken), keep_root=roots)):
        pytest.fail("yielded although the server never started")
    assert roots and not roots[0].exists()
    assert processes_mentioning(str(roots[0])) == []  # no postgres left running on the cluster


@pytest.mark.timeout(180)
def test_a_port_taken_before_postgres_binds_it_is_retried(tmp_path):
    import os
    import shutil

    root = Path(tempfile.mkdtemp(prefix="tim-pg-port-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    try:
        _as_postgres("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        with pytest.raises(PortTaken, match=str(taken)):
            _start_postgres(root, data, taken)
        assert not pg_running(data)
        ports = iter([taken])  # the first "free" port is the taken one, then real free ports
        port = on_free_port(lambda p: _start_postgres(root, data, next(ports, p)))
        assert port != taken and pg_running(data)
    finally:
        held.close()
        _as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
