"""The MLflow run of a training and what ties it to its inputs: one run per training identity, continued by a
restart (the run id is kept beside the Ray checkpoints), with the data version and params on it.

The driver owns the run (creates or resumes it, logs params, lineage tags and the final model); rank 0 of the
Ray workers attaches to it to log per-step metrics, system metrics and sample grids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.common.tracking import Tracking, flatten

IDENTITY_TAG = "tim.train.identity"


class StorageRecord:
    """A small JSON file beside a training's Ray checkpoints (a local folder or s3://, through pyarrow):
    ``<name>.mlflow.json`` names the MLflow run, ``<name>.checkpoint.json`` the last checkpoint every rank saved."""

    def __init__(self, storage: str, filename: str) -> None:
        import pyarrow.fs

        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        self.fs.create_dir(root, recursive=True)
        self.path = f"{root}/{filename}"

    def read(self) -> dict | None:
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read())

    def write(self, payload: dict) -> None:
        tmp = f"{self.path}.tmp"  # then move: a reader sees the old record or the new one, never half of one
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(payload).encode())
        self.fs.move(tmp, self.path)


def open_run(tracking: Tracking, experiment: str, identity: str, resume_run_id: str | None,
             params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Resume ``resume_run_id`` if the store still has it, else create a run; returns its id."""
    from mlflow.entities import Param, RunStatus
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    experiment_id = (found.experiment_id if found is not None
                     else client.create_experiment(experiment, artifact_location=tracking.artifact_location()))
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return resume_run_id
    run = client.create_run(experiment_id, run_name=f"train-{identity}", tags={IDENTITY_TAG: identity, **tags})
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for start in range(0, len(flat), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=flat[start:start + 100])
    return run.info.run_id


def finish_run(tracking: Tracking, run_id: str, status: str, artifacts: Path | None = None,
               artifact_path: str = "model") -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    if artifacts is not None:
        client.log_artifacts(run_id, str(artifacts), artifact_path=artifact_path)
    client.set_terminated(run_id, status=status)
