"""Fixtures for the training tests: one local Ray for the session, params from the committed cpu-tiny profile,
and the reference run every other training is compared with (the tiny shards and the PostgreSQL-backed MLflow
server are tests/conftest.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.common.params import deep_merge, read_params, resolve_profile
from components.train.settings import TrainParams
from components.train.stage import train
from tests.services import BIN, free_port  # noqa: F401  (used by the training tests)

REPO = Path(__file__).resolve().parents[2]


def tiny_params(**overrides) -> TrainParams:
    """params.yaml's train section under the cpu-tiny profile, deep-merged with ``overrides``."""
    section = dict(read_params(REPO / "params.yaml")["train"], profile="cpu-tiny")
    return TrainParams.model_validate(deep_merge(resolve_profile(section, "train"), overrides))


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for every training test (starting it costs ~5 s)."""
    from components.common.ray_cluster import start_local_ray

    start_local_ray(num_cpus=2, object_store_mb=200)
    import ray

    yield ray
    ray.shutdown()


def loss_history(tracking_uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in history}


def train_through_a_worker_failure(shards, tmp_path, **overrides):
    """Train cpu-tiny while rank 1 fails once at step 4 (Ray restarts the worker group, max_failures = 1); check
    that the run went on from the step-3 checkpoint, not from step 0: rank 0 saw steps 1-3 once (a restart from
    scratch would repeat them), then 4-6, and every step is logged once. Returns the TrainResult."""
    marker, steps_seen = tmp_path / "failed-once", tmp_path / "steps.txt"

    def fail_once(rank: int, step: int) -> None:
        if rank == 0:
            with open(steps_seen, "a") as f:
                f.write(f"{step}\n")
        if rank == 1 and step == 4 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected worker failure")

    params = tiny_params(**deep_merge({"distributed": {"max_failures": 1}, "schedule": {"sample_every": 0}},
                                      overrides))
    result = train(params, shards, tmp_path / "model", project_dir=tmp_path, on_step=fail_once)
    assert marker.exists() and result.step == 6
    steps = [int(s) for s in steps_seen.read_text().split()]
    assert steps[:3] == [1, 2, 3] and steps.count(1) == 1 and steps.count(3) == 1 and steps[-3:] == [4, 5, 6]
    assert sorted(loss_history(result.tracking_uri, result.run_id)) == [1, 2, 3, 4, 5, 6]
    return result


def export_weights(directory) -> dict[str, torch.Tensor]:
    import tim_core

    model, _ = tim_core.load_pretrained(directory)
    return model.state_dict()


def assert_same_weights(a, b, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:.2e} > {atol:.0e}"


@pytest.fixture(scope="session")
def reference(local_ray, shards, tmp_path_factory):
    project = tmp_path_factory.mktemp("reference")
    result = train(tiny_params(), shards, project / "model", project / "train_run.json", project_dir=project)
    return project, result
