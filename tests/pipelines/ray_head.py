"""A real single-node Ray head with the dashboard (the Jobs API) and token authentication, for the tests of the
``ray_jobs`` training mode: started as its own process group, every listener on 127.0.0.1 that Ray lets us choose
(the GCS and raylet gRPC servers bind all interfaces: run it inside a private network namespace, see
test_ray_jobs.py), always stopped by signalling that group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.services import BIN, free_port

START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class RayHead:
    dashboard: str        # the Jobs API address
    token: str            # the cluster's auth token (what a client sends)
    env: dict[str, str]   # the environment the head runs with (PATH has this venv's `tim`)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left (`ray start --block` ignores SIGTERM)."""
    try:
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)  # anything of the group still alive?
            except ProcessLookupError:
                proc.wait(timeout=5)
                return
            time.sleep(0.2)
    proc.wait(timeout=5)


@contextlib.contextmanager
def ray_head(root: Path, num_cpus: int = 2) -> Iterator[RayHead]:
    """A head whose token, temp files and logs are under ``root``."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    dashboard_port = free_port()
    # Ray's unix sockets live under its temp dir and must stay within 107 characters: a short folder of its own.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    log = open(root / "ray-head.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--port={free_port()}", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}; see {root / 'ray-head.log'}")
            try:
                requests.get(f"{url}/api/version", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray dashboard did not answer within {START_TIMEOUT_S} s") from None
                time.sleep(0.5)
        yield RayHead(url, token, env)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":  # a head for manual checks: python -m tests.pipelines.ray_head ROOT
    with ray_head(Path(sys.argv[1])) as head:
        print(head.dashboard, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(3600)
