"""A relative ``sqlite:///mlruns.db`` (what `tim promote` tells users to open) names ./mlruns.db, not /mlruns.db."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.common.errors import TimError
from components.common.tracking import Tracking, sqlite_file


def test_sqlite_uris_follow_sqlalchemy():
    assert sqlite_file("sqlite:///mlruns.db") == Path("mlruns.db")
    assert sqlite_file("sqlite:////srv/mlflow/mlruns.db") == Path("/srv/mlflow/mlruns.db")


def test_relative_store_in_the_working_directory_connects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TimError, match="no MLflow store at mlruns.db"):
        Tracking("sqlite:///mlruns.db").client(must_exist=True)
    MlflowClient(tracking_uri="sqlite:///mlruns.db").search_experiments()  # creates ./mlruns.db
    assert Tracking("sqlite:///mlruns.db").client(must_exist=True).search_registered_models() == []
