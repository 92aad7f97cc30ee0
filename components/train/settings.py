"""Schema of params.yaml's ``train`` section (validated before Ray, DeepSpeed or MLflow start), and the typed
configuration the driver hands to every Ray worker.

A training's identity (the name of its checkpoints and MLflow run) is a hash of every field except those marked
``runtime(...)`` below: budgets and knobs that may change between an interrupted run and its restart. A new field
is part of the identity unless it is marked where it is defined.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from components.common.params import StageParams

RUNTIME = {"identity": False}


def runtime(default: Any, **constraints: Any) -> Any:
    """A field that may change on a restart without starting a new training (not part of the identity)."""
    return Field(default, json_schema_extra=RUNTIME, **constraints)


def identity_fields(model: BaseModel) -> dict[str, Any]:
    """The model's values as JSON, without its runtime fields (recursively)."""
    out = {}
    for name, field in type(model).model_fields.items():
        if field.json_schema_extra == RUNTIME:
            continue
        value = getattr(model, name)
        out[name] = identity_fields(value) if isinstance(value, BaseModel) else field_json(model, name)
    return out


def field_json(model: BaseModel, name: str) -> Any:
    return model.model_dump(mode="json", include={name})[name]


class ModelParams(StageParams):
    preset: Literal["tiny", "small", "B/4", "XL/2"] = "tiny"
    # Extra build_model overrides (patch_size, depth, ...); num_classes, input_size and in_channels
    # always come from the shard index so the model fits the data it is trained on.
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _data_keys_not_overridden(self) -> ModelParams:
        clash = {"num_classes", "input_size", "in_channels"} & set(self.overrides)
        if clash:
            raise ValueError(f"{sorted(clash)} are read from the shard index, remove them from model.overrides")
        return self


class TransportParams(StageParams):
    name: str = "ot_fm"
    params: dict[str, Any] = Field(default_factory=dict)


class ObjectiveParams(StageParams):
    name: Literal["tim", "fm", "meanflow"] = "tim"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimParams(StageParams):
    global_batch: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    base_lr: float = Field(1e-4, gt=0)
    # lr = base_lr * global_batch / ref_batch (linear scaling rule).
    ref_batch: int = Field(256, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)


class EmaParams(StageParams):
    decay: float = Field(0.9999, gt=0, lt=1)
    # decay_n = min(decay, (1 + n) / (10 + n)): keeps the EMA horizon inside short runs (docs/method.md, 9).
    warmup: bool = True


class ScheduleParams(StageParams):
    max_steps: int = runtime(1000, ge=1)
    # Wall-clock budget of one invocation (a resumed run gets a fresh budget); 0 = no limit.
    max_minutes: float = runtime(0.0, ge=0)
    checkpoint_every: int = runtime(500, ge=1)
    log_every: int = runtime(10, ge=1)
    # Sample grid (EMA weights, one row per class) logged to MLflow every sample_every steps; 0 = only at the end.
    sample_every: int = runtime(0, ge=0)
    sample_steps: int = runtime(4, ge=1)
    sample_per_class: int = runtime(8, ge=1)
    # At most this many classes (rows) in a grid, evenly spaced over the label ids.
    sample_classes: int = runtime(10, ge=1)
    sample_cfg_scale: float = runtime(1.0, ge=0)
    # Number of Ray checkpoints kept on disk.
    keep_checkpoints: int = runtime(2, ge=1)


class DataParams(StageParams):
    shuffle_buffer: int = Field(1000, ge=0)
    loader_workers: int = runtime(0, ge=0)
    # Re-check shard checksums in every worker, on top of the check the driver does before starting.
    verify_in_workers: bool = runtime(False)
    # On resume, "exact" replays the sample stream up to the checkpoint (same batches as an uninterrupted run,
    # costs reading those samples again); "reshuffle" starts a new shuffle seeded by the step (free).
    resume: Literal["exact", "reshuffle"] = runtime("exact")


class DistributedParams(StageParams):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Existing Ray cluster ("host:port" or "ray://host:port"); null = RAY_ADDRESS or an in-process local Ray.
    ray_address: str | None = runtime(None)
    max_failures: int = runtime(0, ge=-1)
    # Where Ray keeps checkpoints; relative paths are under the project. On a cluster: shared storage (s3://...).
    storage_path: str = runtime("runs/train")
    # Local Ray only: object store size and how long to wait for an address/server probe.
    object_store_mb: int = runtime(200, ge=80)
    probe_timeout_s: float = runtime(5.0, gt=0)


class RunParams(StageParams):
    """The MLflow experiment of the run (where the store is: params.yaml's ``mlflow`` section)."""

    experiment: str = "tim"
    log_system_metrics: bool = runtime(True)


class TrainParams(StageParams):
    seed: int = 0
    model: ModelParams = ModelParams()
    transport: TransportParams = TransportParams()
    objective: ObjectiveParams = ObjectiveParams()
    optim: OptimParams = OptimParams()
    ema: EmaParams = EmaParams()
    schedule: ScheduleParams = ScheduleParams()
    data: DataParams = DataParams()
    distributed: DistributedParams = DistributedParams()
    mlflow: RunParams = RunParams()
    # Warm start: the weights of models:/NAME@ALIAS (or models:/NAME/VERSION, runs:/ID/model) or of a folder with
    # model.safetensors + config.json, loaded into the network before DeepSpeed starts (a resumed checkpoint
    # still wins). Part of the identity: the string, plus the weights' hash for a folder (an alias is a moving
    # pointer on purpose: a scheduled retrain from @champion on unchanged data is the same training).
    init_from: str | None = None

    @field_validator("init_from")
    @classmethod
    def _init_source(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None and v.startswith("models:/") and not ("@" in v or v.count("/") >= 2):
            raise ValueError("expected models:/NAME@ALIAS or models:/NAME/VERSION (or runs:/ID/model, or a folder)")
        return v

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainParams:
        per_step = self.distributed.num_workers * self.optim.grad_accum
        if self.optim.global_batch % per_step:
            raise ValueError(
                f"optim.global_batch={self.optim.global_batch} is not divisible by distributed.num_workers"
                f" x optim.grad_accum = {per_step}; pick a multiple of {per_step}"
            )
        jvp = self.objective.name == "meanflow" or self.objective.params.get("derivative") == "jvp"
        if jvp and self.distributed.zero_stage == 3:
            raise ValueError("the JVP derivative (objective meanflow, or derivative: jvp) does not run under "
                             "ZeRO-3's partitioned parameters; use derivative: dde or zero_stage <= 2")
        return self

    @property
    def micro_batch(self) -> int:
        return self.optim.global_batch // (self.distributed.num_workers * self.optim.grad_accum)

    @property
    def lr(self) -> float:
        return self.optim.base_lr * self.optim.global_batch / self.optim.ref_batch

    def identity(self, data_version: str, init_weights: str | None = None) -> str:
        """Short hash naming a training: a restart with the same identity resumes its checkpoints.
        ``init_weights``: the hash of the warm-start weights when ``init_from`` is a folder."""
        fields = {"params": identity_fields(self), "data": data_version}
        if init_weights:
            fields["init_weights"] = init_weights
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


OnStep = Callable[[int, int], None]  # (rank, step) after each optimizer step: a hook for tools and tests


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray worker needs, decided by the driver before any worker starts."""

    params: TrainParams
    shard_dir: str
    identity: str
    model_kwargs: dict[str, Any]   # tim_core.build_model arguments (data-dependent sizes filled in)
    tracking_uri: str
    run_id: str
    deadline: float | None         # time.time() at which every rank stops (schedule.max_minutes)
    on_step: OnStep | None = None
    storage: str = ""              # Ray's storage_path and run name: the last complete checkpoint is recorded
    name: str = ""                 # beside them (<storage>/<name>.checkpoint.json), see train.worker
    init_weights: Any = None       # ray.ObjectRef of the init_from state dict, loaded before DeepSpeed starts
