"""Test-wide settings (no telemetry from any engine) and the session fixtures that several suites share:
tiny real shards and a PostgreSQL-backed MLflow server."""

import os

# Set before any engine is imported by a test module.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402

from tests.services import mlflow_on_postgres, postgres_available  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """prepare -> validate -> shard on 200 MNIST digits (the real stages), once per session; the data folder."""
    from components.data import prepare, shard, validate

    root = tmp_path_factory.mktemp("tiny-data")
    prepare.prepare(prepare.PrepareParams(limit=200), root / "prepared")
    validate.validate(validate.ValidateParams(min_train_per_class=5), root / "prepared", root / "validated")
    shard.shard(shard.ShardParams(shard_size=40), root / "prepared", root / "validated", root / "shards")
    return root


@pytest.fixture(scope="session")
def shards(tiny_data):
    return tiny_data / "shards"


@pytest.fixture(scope="session")
def mlflow_server():
    """One PostgreSQL-backed `mlflow server` on 127.0.0.1 for the whole session; yields its tracking URI."""
    if not postgres_available():
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed: the MLflow server tests "
                    "need PostgreSQL 15 (Debian package postgresql-15)")
    with mlflow_on_postgres() as uri:
        yield uri
