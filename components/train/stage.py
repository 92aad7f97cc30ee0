"""Stage `train`: check every input, then run components/train/worker.py on Ray Train workers (DeepSpeed
ZeRO inside each), track the run in MLflow and export the EMA weights.

  tim train --shards data/shards --out models/tim --run-file models/train_run.json [--profile ..] [--set ..]

Locally Ray starts in this process with CPU workers over gloo; with ``distributed.ray_address`` (or
RAY_ADDRESS) it joins that cluster, GPU workers over NCCL when ``distributed.use_gpu``. Running the stage
again with the same training identity (params minus budgets and runtime knobs, plus the data version)
resumes from the latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.common.errors import ModelError, ShardError
from components.common.files import atomic_dir, file_sha256, write_json
from components.common.ray_cluster import ray_session
from components.common.tracking import MlflowParams, Tracking, git_commit
from components.data.reader import data_version, read_index, sample_shape, verify_shards
from components.train.lineage import StorageRecord, finish_run, open_run
from components.train.settings import OnStep, TrainParams, WorkerConfig
from components.train.worker import EXPORT_DIR, STATE_FILE, train_loop

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
    """The train split exists, matches its checksums and has a sample for every reader; latent shards come with
    the VAE they were encoded with."""
    index = read_index(shard_dir)
    verify_shards(shard_dir, "train")
    if "latent" in index:
        import tim_core

        try:
            tim_core.LatentSpace.load(shard_dir, index["latent"])
        except (FileNotFoundError, ValueError) as e:
            raise ShardError(f"{shard_dir}: latent shards without their VAE: {e}; rerun `tim encode`") from None
    readers = params.distributed.num_workers * max(1, params.data.loader_workers)
    count = index["splits"]["train"]["count"]
    if count < readers:
        raise ShardError(f"{shard_dir / 'index.json'}: the train split has {count} samples, fewer than the "
                         f"{readers} readers (num_workers x loader_workers); use fewer workers or more data")
    return index


def storage_uri(params: TrainParams, project_dir: Path) -> str:
    """Ray wants an absolute path or a URI; relative paths are taken under the project."""
    storage = params.distributed.storage_path
    return storage if "://" in storage else str((project_dir / storage).resolve())


def _model_kwargs(params: TrainParams, index: dict[str, Any]) -> dict[str, Any]:
    channels, height, width = sample_shape(index)
    return {"preset": params.model.preset, **params.model.overrides, "num_classes": index["num_classes"],
            "input_size": [height, width], "in_channels": channels}


# The folder of the EMA export the driver logs to a training run (lineage.finish_run's artifact_path).
RUN_MODEL_ARTIFACT = "model"


@contextmanager
def init_folder(source: str, tracking: Tracking) -> Iterator[Path]:
    """A local folder with the weights ``train.init_from`` names: the folder itself, or the EMA export of the
    training run behind ``runs:/ID/model`` / ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, downloaded."""
    if not source.startswith(("runs:/", "models:/")):
        yield Path(source)
        return
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = tracking.client(must_exist=True)
    try:
        if source.startswith("models:/"):
            ref = source.removeprefix("models:/").strip("/")
            version = (client.get_model_version_by_alias(*ref.split("@", 1)) if "@" in ref
                       else client.get_model_version(*ref.rsplit("/", 1)))
            # The registered pyfunc wraps the same weights its training run logged as its EMA export.
            artifact = f"runs:/{version.run_id}/{RUN_MODEL_ARTIFACT}"
        else:
            artifact = source
        with tempfile.TemporaryDirectory(prefix="tim-init-") as tmp:
            yield Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=tmp,
                                                            tracking_uri=tracking.uri))
    except MlflowException as exc:
        raise ModelError(f"train.init_from {source}: not found in MLflow at {tracking.uri}: {exc.message}") from None


def vae_of(latent: dict[str, Any] | None) -> str:
    """How a model's space reads in an error: pixels, or the latents of one VAE (its name and weights' hash)."""
    return f"latents of VAE {latent['vae']['name']} (sha256 {latent['vae']['sha256'][:12]}...)" if latent else "pixels"


def latent_tags(index: dict[str, Any]) -> dict[str, str]:
    """The MLflow run's record of the VAE behind latent shards (nothing for pixels)."""
    latent = index.get("latent")
    if not latent:
        return {"tim.data.space": "pixels"}
    vae = latent["vae"]
    return {"tim.data.space": "latent", "tim.vae.name": str(vae["name"]), "tim.vae.revision": str(vae["revision"]),
            "tim.vae.sha256": vae["sha256"], "tim.latent.scale": str(latent["scale"]),
            "tim.latent.shift": str(latent["shift"])}


def init_weights_digest(init_from: str | None) -> str | None:
    """The identity's share of a warm start beyond the ``init_from`` string: the hash of a folder's weights
    (an MLflow URI names its weights already, or is an alias that moves on purpose)."""
    from tim_core.io import WEIGHTS

    if not init_from or init_from.startswith(("runs:/", "models:/")):
        return None
    weights = Path(init_from) / WEIGHTS
    return file_sha256(weights) if weights.is_file() else None  # a missing file fails in init_weights


def identity_of(params: TrainParams, shard_dir: str | Path) -> str:
    """The training identity of ``params`` on these shards (checkpoint folder and MLflow run name)."""
    return params.identity(data_version(shard_dir), init_weights_digest(params.init_from))


def init_weights(params: TrainParams, model_kwargs: dict[str, Any], tracking: Tracking,
                 latent: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The state dict ``train.init_from`` names (None without it); the network it was saved from must be the one
    this training builds, in the same space (pixels, or the latents of the same VAE: ``latent``)."""
    if not params.init_from:
        return None
    import torch
    from safetensors.torch import load_file

    import tim_core
    from tim_core.io import CONFIG, WEIGHTS

    source = params.init_from
    with init_folder(source, tracking) as folder:
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise ModelError(f"train.init_from {source}: {folder} has no {WEIGHTS} + {CONFIG} (a folder written "
                             "by `tim train`, or a model registered by `tim register`)")
        config = json.loads((folder / CONFIG).read_text())
        saved = config["model"]
        with torch.device("meta"):  # the configuration only, no memory
            wanted = tim_core.build_model(**model_kwargs).config
        differ = sorted(k for k in wanted.keys() | saved.keys() if wanted.get(k) != saved.get(k))
        if differ:
            raise ModelError(f"train.init_from {source}: its network differs from this training's in "
                             + ", ".join(f"{k} ({saved.get(k)!r} vs {wanted.get(k)!r})" for k in differ))
        theirs, ours = (vae_of(config.get("latent")), vae_of(latent))
        if theirs != ours:
            raise ModelError(f"train.init_from {source}: trained on {theirs}, this training runs on {ours}")
        weights = load_file(str(folder / WEIGHTS), device="cpu")
    log.info("warm start from %s (%d tensors)", source, len(weights))
    return weights


def train(params: TrainParams, shard_dir: str | Path, out_dir: str | Path, run_file: str | Path | None = None,
          *, tracking: Tracking | None = None, project_dir: str | Path | None = None,
          on_step: OnStep | None = None) -> TrainResult:
    """Train (or resume) with validated params; writes the EMA export to ``out_dir`` and returns the run.
    ``tracking``: the MLflow store (default: the rule of components.common.tracking with no params entry)."""
    project_dir = Path(project_dir or Path.cwd()).resolve()
    tracking = tracking or Tracking.resolve(MlflowParams(), project_dir)
    shard_dir, out_dir = Path(shard_dir).resolve(), Path(out_dir)
    d = params.distributed

    # Everything that can be wrong with the inputs fails here, before Ray starts or a checkpoint exists.
    index = check_shards(params, shard_dir)
    version = data_version(shard_dir)
    tracking.check()
    model_kwargs = _model_kwargs(params, index)
    warm = init_weights(params, model_kwargs, tracking, index.get("latent"))
    identity = identity_of(params, shard_dir)
    with ray_session(d.ray_address, num_cpus=d.num_workers * d.cpus_per_worker, object_store_mb=d.object_store_mb,
                     probe_timeout_s=d.probe_timeout_s):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        storage, name = storage_uri(params, project_dir), f"train-{identity}"
        marker = StorageRecord(storage, f"{name}.mlflow.json")
        commit, dirty = git_commit(project_dir)
        run_id = open_run(tracking, params.mlflow.experiment, identity, (marker.read() or {}).get("run_id"),
                          params.model_dump(mode="json"),
                          tags={"mlflow.source.git.commit": commit, "tim.git.dirty": str(dirty),
                                "tim.data.version": version, "tim.data.shards": str(shard_dir),
                                "tim.ray.checkpoints": f"{storage}/{name}", **latent_tags(index)})
        marker.write({"run_id": run_id})
        log.info("training %s: checkpoints in %s/%s, MLflow run %s at %s", identity, storage, name, run_id,
                 tracking.uri)

        deadline = time.time() + params.schedule.max_minutes * 60 if params.schedule.max_minutes else None
        import ray

        config = WorkerConfig(params=params, shard_dir=str(shard_dir), identity=identity,
                              model_kwargs=model_kwargs, tracking_uri=tracking.uri, run_id=run_id,
                              deadline=deadline, on_step=on_step, storage=storage, name=name,
                              init_weights=ray.put(warm) if warm is not None else None)
        resources = {"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config={"worker": config},
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=d.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=params.schedule.keep_checkpoints)))
        try:
            result = trainer.fit()
        except BaseException as exc:
            finish_run(tracking, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

        with result.checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            with atomic_dir(out_dir) as tmp:
                shutil.copytree(Path(directory) / EXPORT_DIR, tmp, dirs_exist_ok=True)
        finish_run(tracking, run_id, "FINISHED", artifacts=out_dir)
        outcome = TrainResult(run_id=run_id, experiment=params.mlflow.experiment, tracking_uri=tracking.uri,
                              step=state["step"], images=state["images"], identity=identity,
                              data_version=version, export_dir=str(out_dir), checkpoint=result.checkpoint.path)
        if run_file is not None:
            write_json(run_file, asdict(outcome))
        log.info("trained to step %d; EMA weights in %s; MLflow run %s", outcome.step, out_dir, run_id)
        return outcome

