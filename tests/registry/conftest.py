"""Fixtures for the registry tests: real MLflow stores (an embedded SQLite file and a PostgreSQL-backed
`mlflow server`, both on this machine), and real tiny TiM models whose training runs carry evaluations in the
format `tim evaluate` writes, with figures chosen per test."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tim_core
from components.common.tracking import Tracking
from components.registry.client import RegistryParams
from components.registry.register import register
from tests.services import free_port  # noqa: F401  (used by the registry tests)

SIZE = 8       # image side of the test models
CLASSES = 3
_names = itertools.count()


def tiny_model(seed: int) -> tim_core.TiM:
    """A 1-block TiM on 8x8 digits whose output layer is random (zero-init would make every model the same)."""
    torch.manual_seed(seed)
    model = tim_core.build_model(input_size=SIZE, in_channels=1, num_classes=CLASSES, patch_size=4, hidden_size=32,
                                 depth=1, num_heads=2, adaln_rank=8)
    torch.nn.init.normal_(model.final_linear.weight, std=0.05)
    return model


def metrics_json(fid: dict[int, float], accuracy: float = 0.9, monotone: bool | None = True) -> dict:
    """metrics.json as components/evaluate.py writes it (the keys the registry reads, plus their neighbours)."""
    ema = {f"nfe_{n}": {"fid": v, "kid": v / 1000, "precision": 0.7, "recall": 0.6, "accuracy": accuracy,
                        "sec_per_image": 0.001 * n} for n, v in fid.items()}
    figures = {"ema": ema, "monotone": {"verdict": monotone}}
    return {"objective": "tim", "mode": "transition", "cfg_scale": 1.0, "cfg_scales": [1.0], "samples_per_set": 12,
            "evaluator_val_accuracy": 0.95, "floor_set_size": 12, "floor": {"fid": 1.0}, **figures,
            "scales": {"1": figures}}


@dataclass
class Store:
    """One MLflow store and helpers to put trained-and-evaluated models into it."""

    uri: str
    root: Path

    def params(self, name: str, **overrides) -> RegistryParams:
        base = {"model_name": name, "lock": {"settle_s": 0.5, "wait_s": 60}}
        return RegistryParams.model_validate({**base, **overrides})

    @property
    def tracking(self) -> Tracking:
        return Tracking(self.uri)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def trained(self, seed: int, metrics: dict | None) -> Path:
        """A saved tiny model and its training run (with ``metrics`` logged as its evaluation); the run file."""
        client = self.client()
        experiment = client.get_experiment_by_name("tim-tests")
        if experiment is None:
            location = (self.root / "artifacts").as_uri() if self.uri.startswith("sqlite") else None
            experiment_id = client.create_experiment("tim-tests", artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id).info.run_id
        if metrics is not None:
            client.log_dict(run_id, metrics, "evaluation/metrics.json")
        client.set_terminated(run_id)
        folder = self.root / f"model-{run_id}"
        tim_core.save_pretrained(tiny_model(seed), folder / "tim", tim_core.get_transport("ot_fm"))
        (folder / "train_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": self.uri,
                                                           "data_version": f"data-{seed}"}))
        return folder

    def version(self, name: str, fid: dict[int, float], seed: int = 0, **metrics) -> str:
        """`tim register` of a fresh tiny model whose evaluation reports ``fid`` per NFE; the version."""
        folder = self.trained(seed, metrics_json(fid, **metrics))
        return str(register(self.params(name), folder / "tim", folder / "train_run.json", None,
                            tracking=self.tracking)["version"])


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("registry-sqlite")
    return Store(f"sqlite:///{root / 'mlruns.db'}", root)


@pytest.fixture(scope="session")
def server_store(mlflow_server, tmp_path_factory) -> Store:
    return Store(mlflow_server, tmp_path_factory.mktemp("registry-server"))


@pytest.fixture(params=["sqlite", "server"])
def store(request) -> Store:
    """Each test that takes ``store`` runs on both backends."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def name(request) -> str:
    """A registered-model name of its own for each test (the stores are shared by the session)."""
    return f"tim-test-{next(_names)}"
