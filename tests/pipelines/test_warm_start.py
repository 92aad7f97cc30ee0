"""``train.init_from``: what it accepts, the weights it yields (a folder, or the training run behind a registered
model's alias), the network check, and its share of the training identity. The load itself happens in the Ray
workers; test_run_local.py watches a warm-started job's first loss."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import tim_core
from components.common.errors import ModelError
from components.common.tracking import Tracking
from components.train.settings import TrainParams
from components.train.stage import identity_of, init_weights
from tim_core.io import WEIGHTS

KWARGS = {"preset": "tiny", "num_classes": 10, "input_size": [28, 28], "in_channels": 1}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = tim_core.build_model(**KWARGS)
    return tim_core.save_pretrained(model, tmp_path / "model", transport=tim_core.get_transport("ot_fm"))


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "index.json").write_text('{"splits": {}}')  # the identity reads the index's hash only
    return folder


def test_init_from_takes_registry_uris_and_folders_only_in_full():
    assert TrainParams(init_from="models:/tim-mnist@champion").init_from == "models:/tim-mnist@champion"
    assert TrainParams(init_from="models:/tim-mnist/3").init_from == "models:/tim-mnist/3"
    assert TrainParams(init_from="  ").init_from is None
    with pytest.raises(ValidationError, match="models:/NAME@ALIAS"):
        TrainParams(init_from="models:/tim-mnist")


def test_identity_includes_the_warm_start_and_a_folders_weights(saved, shards):
    scratch = identity_of(TrainParams(), shards)
    from_folder = identity_of(TrainParams(init_from=str(saved)), shards)
    from_alias = identity_of(TrainParams(init_from="models:/tim-mnist@champion"), shards)
    assert len({scratch, from_folder, from_alias}) == 3
    weights = load_file(str(saved / WEIGHTS))
    next(iter(weights.values())).add_(1.0)
    save_file(weights, str(saved / WEIGHTS))
    assert identity_of(TrainParams(init_from=str(saved)), shards) != from_folder   # same path, other weights


def test_weights_come_from_a_folder_of_the_same_network(saved, tmp_path):
    store = Tracking(f"sqlite:///{tmp_path / 'mlruns.db'}")
    weights = init_weights(TrainParams(init_from=str(saved)), KWARGS, store)
    expected = load_file(str(saved / WEIGHTS))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert init_weights(TrainParams(), KWARGS, store) is None
    with pytest.raises(ModelError, match=r"differs from this training's in .*num_classes \(10 vs 7\)"):
        init_weights(TrainParams(init_from=str(saved)), {**KWARGS, "num_classes": 7}, store)
    with pytest.raises(ModelError, match="has no model.safetensors"):
        init_weights(TrainParams(init_from=str(tmp_path)), KWARGS, store)


def test_weights_of_a_registered_alias_are_its_training_runs_export(saved, tmp_path):
    from mlflow import MlflowClient

    store = Tracking(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client = MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)
    experiment = client.create_experiment("warm", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(saved), artifact_path="model")   # what `tim train` logs as its EMA export
    client.create_registered_model("tim-warm")
    version = client.create_model_version("tim-warm", f"runs:/{run_id}/registry_model", run_id=run_id)
    client.set_registered_model_alias("tim-warm", "champion", version.version)

    weights = init_weights(TrainParams(init_from="models:/tim-warm@champion"), KWARGS, store)
    expected = load_file(str(saved / WEIGHTS))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(ModelError, match="models:/tim-warm@nobody: not found in MLflow"):
        init_weights(TrainParams(init_from="models:/tim-warm@nobody"), KWARGS, store)
