"""What a train task does when `tim train` ran somewhere else (a Ray cluster through the Jobs API, a KubeRay
RayJob): find the MLflow run it finished and bring its model and run file into the task's outputs, in the form
`tim train` writes them locally."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from components.common.errors import RetryableError
from components.common.files import atomic_dir, write_json
from components.common.tracking import Tracking
from components.train.lineage import IDENTITY_TAG
from components.train.stage import RUN_MODEL_ARTIFACT, TrainResult


def working_dir(folder: Path, shards: str | Path, params: Path) -> Path:
    """The remote job's working folder: ``shards/`` and ``params.yaml`` (Ray unpacks it on every node and starts
    the entrypoint inside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(shards, folder / "shards")
    shutil.copy2(params, folder / "params.yaml")
    return folder


def train_command(profile: str, sets: list[str], tracking_uri: str) -> list[str]:
    """`tim train` run from a working folder holding ``params.yaml`` and ``shards/`` (see ray_jobs and kuberay),
    tracking at the pipeline's MLflow store."""
    args = ["tim", "train", "--params", "params.yaml"]
    if profile:
        args += ["--profile", profile]
    for assignment in [*sets, f"mlflow.tracking_uri={tracking_uri}"]:
        args += ["--set", assignment]
    return args + ["--shards", "shards", "--out", "model", "--run-file", "train_run.json"]


def finished_run(tracking: Tracking, experiment: str, identity: str, since_ms: int):
    """The run of training ``identity`` that finished after ``since_ms`` (the remote job's submission)."""
    client = tracking.client(must_exist=True)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{IDENTITY_TAG}` = '{identity}' and attributes.status = 'FINISHED' "
                      f"and attributes.end_time >= {since_ms}",
        order_by=["attributes.end_time DESC"], max_results=1)
    if not runs:
        raise RetryableError(f"the remote training reported success, but MLflow at {tracking.uri} has no finished "
                             f"run of identity {identity} in experiment {experiment!r} since it started: the job "
                             "logged to another store (check mlflow.tracking_uri on the cluster)")
    return runs[0]


def fetch_training(tracking: Tracking, experiment: str, run, model_dir: str | Path,
                   run_file: str | Path) -> TrainResult:
    """The run's EMA export into ``model_dir`` and the run file `tim train` would have written."""
    import mlflow.artifacts

    model_dir = Path(model_dir)
    with atomic_dir(model_dir) as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run.info.run_id}/{RUN_MODEL_ARTIFACT}",
                                                   dst_path=str(tmp / "download"), tracking_uri=tracking.uri)
        for item in Path(path).iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "download")
    lineage = json.loads((model_dir / "config.json").read_text())["train"]
    tags = run.data.tags
    result = TrainResult(run_id=run.info.run_id, experiment=experiment,
                         tracking_uri=tracking.uri, step=lineage["step"], images=lineage["images"],
                         identity=lineage["identity"], data_version=tags.get("tim.data.version", "unknown"),
                         export_dir=str(model_dir), checkpoint=tags.get("tim.ray.checkpoints", ""))
    write_json(run_file, asdict(result))
    return result


def now_ms() -> int:
    return int(time.time() * 1000)
