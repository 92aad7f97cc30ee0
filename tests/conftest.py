"""Test-wide settings (no telemetry from any engine) and the session fixtures that several suites share:
tiny real shards and a PostgreSQL-backed MLflow server."""

import os

# Set before any engine is imported by a test module.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

import sys  # noqa: E402

import pytest  # noqa: E402

from tests.services import mlflow_on_postgres, postgres_available  # noqa: E402


# Settings through which one test could change what a later one talks to (a store, a bucket, a cluster).
WATCHED = ("MLFLOW_", "AWS_", "RAY_ADDRESS", "KFP_")


def _watched_state() -> dict:
    state = {k: v for k, v in os.environ.items() if k.startswith(WATCHED)}
    if "mlflow" in sys.modules:  # the process-wide URIs that mlflow.set_tracking_uri / set_registry_uri change
        from mlflow.tracking._model_registry import utils as registry_state
        from mlflow.tracking._tracking_service import utils as tracking_state

        state["mlflow tracking URI"] = tracking_state._tracking_uri
        state["mlflow registry URI"] = registry_state._registry_uri
    return state


@pytest.fixture(autouse=True)
def no_leaks_between_tests():
    """Fail a test that leaves the environment or MLflow's process-wide URIs changed (monkeypatch restores)."""
    before = _watched_state()
    yield
    after = _watched_state()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the test leaked process-wide settings: {changed}"


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
