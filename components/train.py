"""Stage `train`: check every input, then run components/train_loop.py on Ray Train workers (DeepSpeed
ZeRO inside each), track the run in MLflow and export the EMA weights.

  tim train --params params.yaml --shards data/shards --out models/tim --run-file models/train_run.json

Locally Ray starts in this process with CPU workers over gloo; with ``distributed.ray_address`` (or
RAY_ADDRESS) it joins that cluster, GPU workers over NCCL when ``distributed.use_gpu``. Running the stage
again with the same training identity (params minus budgets and runtime knobs, plus the data version)
resumes from the latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from components.atomic import atomic_dir
from components.errors import ShardError
from components.params import load_section
from components.tracking import (data_version, finish_run, git_commit, open_run, probe_tcp, probe_tracking_uri,
                                 resolve_tracking_uri)
from components.train_loop import EXPORT_DIR, STATE_FILE, OnStep, train_loop
from components.train_params import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment: str
    tracking_uri: str
    step: int
    images: int
    identity: str
    data_version: str
    export_dir: str
    checkpoint: str


def check_shards(params: TrainParams, shard_dir: Path) -> dict[str, Any]:
    """The train split exists, matches its checksums and has a sample for every reader."""
    from components.shards import read_index, verify_shards

    index = read_index(shard_dir)
    verify_shards(shard_dir, "train")
    readers = params.distributed.num_workers * max(1, params.data.loader_workers)
    count = index["splits"]["train"]["count"]
    if count < readers:
        raise ShardError(f"{shard_dir / 'index.json'}: the train split has {count} samples, fewer than the "
                         f"{readers} readers (num_workers x loader_workers); use fewer workers or more data")
    return index


def _ray_address(params: TrainParams) -> str | None:
    return params.distributed.ray_address or os.environ.get("RAY_ADDRESS") or None


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


def connect_ray(params: TrainParams) -> bool:
    """Join the configured cluster (probed first) or start a local Ray; True when this call started it."""
    address, d = _ray_address(params), params.distributed
    if address and address != "auto":
        parsed = urlparse(address if "://" in address else f"ray://{address}")
        probe_tcp(parsed.hostname or "", parsed.port or 6379, d.probe_timeout_s, what="Ray cluster")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False  # this process already runs Ray (a notebook, a test session): use it
    if address:
        import ray

        import components
        import tim_core

        # Ship this checkout's code so the cluster runs exactly what the driver validated.
        ray.init(address=address, runtime_env={"py_modules": [components, tim_core]})
    else:
        start_local_ray(max(os.cpu_count() or 1, d.num_workers * d.cpus_per_worker), d.object_store_mb)
    return True


def storage_uri(params: TrainParams, project_dir: Path) -> str:
    """Ray wants an absolute path or a URI; relative paths are taken under the project."""
    storage = params.distributed.storage_path
    return storage if "://" in storage else str((project_dir / storage).resolve())


class RunMarker:
    """``<storage>/<name>.mlflow.json``: the MLflow run of a training, so a restart continues that run."""

    def __init__(self, storage: str, name: str) -> None:
        import pyarrow.fs

        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        self.fs.create_dir(root, recursive=True)
        self.path = f"{root}/{name}.mlflow.json"

    def read(self) -> str | None:
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read())["run_id"]

    def write(self, run_id: str) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({"run_id": run_id}).encode())


def _model_kwargs(params: TrainParams, index: dict[str, Any]) -> dict[str, Any]:
    image = index["image"]
    return {"preset": params.model.preset, **params.model.overrides, "num_classes": index["num_classes"],
            "input_size": [image["height"], image["width"]], "in_channels": image["channels"]}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)


def train(params: TrainParams, shard_dir: str | Path, out_dir: str | Path, run_file: str | Path | None = None,
          *, project_dir: str | Path | None = None, on_step: OnStep | None = None) -> TrainResult:
    """Train (or resume) with validated params; writes the EMA export to ``out_dir`` and returns the run."""
    project_dir = Path(project_dir or Path.cwd()).resolve()
    shard_dir, out_dir = Path(shard_dir).resolve(), Path(out_dir)
    d = params.distributed

    # Everything that can be wrong with the inputs fails here, before Ray starts or a checkpoint exists.
    index = check_shards(params, shard_dir)
    version = data_version(shard_dir)
    identity = params.identity(version)
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri, project_dir)
    probe_tracking_uri(tracking_uri, d.probe_timeout_s)
    started_ray = connect_ray(params)
    try:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        storage, name = storage_uri(params, project_dir), f"train-{identity}"
        marker = RunMarker(storage, name)
        commit, dirty = git_commit(project_dir)
        run_id = open_run(tracking_uri, params.mlflow.experiment, identity, marker.read(),
                          params.model_dump(mode="json"),
                          tags={"mlflow.source.git.commit": commit, "tim.git.dirty": str(dirty),
                                "tim.data.version": version, "tim.data.shards": str(shard_dir),
                                "tim.ray.checkpoints": f"{storage}/{name}"})
        marker.write(run_id)
        log.info("training %s: checkpoints in %s/%s, MLflow run %s at %s", identity, storage, name, run_id,
                 tracking_uri)

        deadline = time.time() + params.schedule.max_minutes * 60 if params.schedule.max_minutes else None
        config = {"params": params.model_dump(mode="json"), "shard_dir": str(shard_dir), "identity": identity,
                  "model_kwargs": _model_kwargs(params, index), "tracking_uri": tracking_uri, "run_id": run_id,
                  "deadline": deadline, "on_step": on_step}
        resources = {"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=d.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=params.schedule.keep_checkpoints)))
        try:
            result = trainer.fit()
        except BaseException as exc:
            finish_run(tracking_uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

        with result.checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            with atomic_dir(out_dir) as tmp:
                shutil.copytree(Path(directory) / EXPORT_DIR, tmp, dirs_exist_ok=True)
        finish_run(tracking_uri, run_id, "FINISHED", artifacts=out_dir)
        outcome = TrainResult(run_id=run_id, experiment=params.mlflow.experiment, tracking_uri=tracking_uri,
                              step=state["step"], images=state["images"], identity=identity,
                              data_version=version, export_dir=str(out_dir), checkpoint=result.checkpoint.path)
        if run_file is not None:
            _write_json_atomic(Path(run_file), asdict(outcome))
        log.info("trained to step %d; EMA weights in %s; MLflow run %s", outcome.step, out_dir, run_id)
        return outcome
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def run(params_path: str | Path, shard_dir: str | Path, out_dir: str | Path,
        run_file: str | Path | None = None) -> TrainResult:
    """CLI entry: read params.yaml's ``train`` section (with its profile) and train."""
    params = load_section("train", TrainParams, params_path)
    return train(params, shard_dir, out_dir, run_file, project_dir=Path(params_path).resolve().parent)
