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
