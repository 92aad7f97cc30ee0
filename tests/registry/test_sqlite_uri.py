"""A relative ``sqlite:///mlruns.db`` (what `tim promote` tells users to open) names ./mlruns.db, not /mlruns.db."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.errors import TimError
from components.registry import connect
from components.tracking import sqlite_file


def test_sqlite_uris_follow_sqlalchemy():
    assert sqlite_file("sqlite:///mlruns.db") == Path("mlruns.db")
    assert sqlite_file("sqlite:////srv/mlflow/mlruns.db") == Path("/srv/mlflow/mlruns.db")


def test_relative_store_in_the_working_directory_connects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TimError, match="no MLflow store at mlruns.db"):
        connect("sqlite:///mlruns.db", timeout_s=5)
    MlflowClient(tracking_uri="sqlite:///mlruns.db").search_experiments()  # creates ./mlruns.db
    assert connect("sqlite:///mlruns.db", timeout_s=5).search_registered_models() == []
