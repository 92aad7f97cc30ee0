"""Fixtures for the training tests: one local Ray for the session, params from the
committed cpu-tiny profile (the tiny shards and the PostgreSQL-backed MLflow server are tests/conftest.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.params import deep_merge, read_params, resolve_profile
from components.train.settings import TrainParams
from tests.services import BIN, free_port  # noqa: F401  (used by the training tests)

REPO = Path(__file__).resolve().parents[2]


def tiny_params(**overrides) -> TrainParams:
    """params.yaml's train section under the cpu-tiny profile, deep-merged with ``overrides``."""
    section = dict(read_params(REPO / "params.yaml")["train"], profile="cpu-tiny")
    return TrainParams.model_validate(deep_merge(resolve_profile(section, "train"), overrides))


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for every training test (starting it costs ~5 s)."""
    from components.train.stage import start_local_ray

    start_local_ray(num_cpus=2, object_store_mb=200)
    import ray

    yield ray
    ray.shutdown()
