"""Joining Ray: the configured cluster (probed first, this checkout's code shipped to it) or a Ray started in this
process on this machine. Used by every stage that fans work out over Ray workers (train, encode)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from components.common.tracking import probe_tcp


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of the local Ray. Ray Train's placement-group cleaner polls the State API every
    second, which needs the dashboard this Ray runs without, and would warn each time."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def start_local_ray(num_cpus: int, object_store_mb: int) -> None:
    """In-process single-machine Ray: CPU workers, no dashboard, every listener on 127.0.0.1."""
    # Ray's switch for single-machine instances; read when ray is first imported, hence before the import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
             runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner})


def connect(address: str | None, *, num_cpus: int, object_store_mb: int, probe_timeout_s: float) -> bool:
    """Join ``address`` (else RAY_ADDRESS; probed first) or start a local Ray with ``num_cpus``; True when this
    call started or joined it (the caller shuts it down), False when this process already runs Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        parsed = urlparse(address if "://" in address else f"ray://{address}")
        probe_tcp(parsed.hostname or "", parsed.port or 6379, probe_timeout_s, what="Ray cluster")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False  # this process already runs Ray (a notebook, a test session): use it
    if address:
        import ray

        import components
        import tim_core

        # Ship this checkout's code so the cluster runs exactly what the driver validated. As folders, not module
        # objects: inside a Ray job, Ray deep-copies this runtime_env to merge it with the job's, and a module
        # cannot be copied.
        packages = [str(Path(m.__file__).parent) for m in (components, tim_core)]
        ray.init(address=address, runtime_env={"py_modules": packages})
    else:
        start_local_ray(max(os.cpu_count() or 1, num_cpus), object_store_mb)
    return True


@contextmanager
def ray_session(address: str | None, *, num_cpus: int, object_store_mb: int, probe_timeout_s: float) -> Iterator[None]:
    """``connect`` for the duration of a block; shuts down only a Ray this block started."""
    started = connect(address, num_cpus=num_cpus, object_store_mb=object_store_mb, probe_timeout_s=probe_timeout_s)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
