"""Sharper checks of what the evaluation's figures mean: validation images as "samples" score at the floor,
raw and EMA weights that differ are told apart (and not swapped), the evaluator refuses to be used below its
minimum validation accuracy, the monotonicity tolerance is exactly 2 sigma sqrt(2 / seeds), and a real
`evaluate` output is what `register` and `promote` read (a renamed metrics.json key breaks this test)."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import torch

import tim_core
from components.common.errors import ModelError
from components.common.tracking import Tracking
from components.data.reader import load_split
from components.evaluation.evaluate import FeatureSpace, evaluate, monotonicity
from components.evaluation.feature_net import (
    EvaluatorParams,
    load_evaluator,
    train_evaluator,
)

from .conftest import save_tiny_model, tiny


@pytest.fixture(scope="module")
def reader_dir(shards, tmp_path_factory):
    """An evaluator that reads the tiny digits (validation accuracy 0.95; the session's cpu-tiny one is at chance,
    0.10, which makes accuracy checks meaningless). About 12 s."""
    out = tmp_path_factory.mktemp("reader") / "evaluator"
    train_evaluator(tiny("train_evaluator", EvaluatorParams, epochs=20, batch_size=16, min_val_accuracy=0.8),
                    shards, out)
    return out


def test_validation_images_as_samples_score_at_the_floor(reader_dir, shards, eval_params):
    evaluator, config = load_evaluator(reader_dir)
    train_x, train_y = load_split(shards, "train")
    val_x, val_y = load_split(shards, "val")
    params = eval_params(kid_subset_size=min(20, len(val_x)))
    space = FeatureSpace(evaluator, train_x, params)
    real = space.measure(val_x, val_y)
    # The evaluator's accuracy on the validation images is the one it recorded when trained, exactly.
    assert real["accuracy"] == config["val_accuracy"]
    # The training images themselves: FID at zero, every sample on the manifold and covering it. (KID is not
    # zero here: the unbiased estimator assumes independent sets, and k(x, x) enters only the cross term.)
    itself = space.measure(train_x, train_y)
    assert itself["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (itself["precision"], itself["recall"]) == (1.0, 1.0)
    # Uniform noise shaped like the images: far from the floor on every figure.
    noise = space.measure(torch.rand(val_x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, val_y)
    assert noise["fid"] > 10 * real["fid"] and noise["kid"] > 10 * abs(real["kid"])
    assert real["precision"] >= 0.5 and noise["precision"] == 0.0
    assert noise["accuracy"] < 0.5 * real["accuracy"]
    # The same images with the labels rotated by one class: the accuracy drops, the distribution figures don't.
    wrong = space.measure(val_x, (val_y + 1) % 10)
    assert wrong["fid"] == real["fid"] and wrong["accuracy"] < 0.5 * real["accuracy"]


def test_raw_and_ema_weights_that_differ_are_told_apart(eval_params, evaluator_dir, shards, tmp_path):
    save_tiny_model(tmp_path / "model", objective="tim")              # stands for the EMA export
    raw = save_tiny_model(tmp_path / "raw-alone", objective="tim")    # the raw weights: moved far from the EMA
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tim_core.save_pretrained(raw, tmp_path / "raw-alone", tim_core.get_transport(), extra={"train": {"objective": "tim"}})
    shutil.copytree(tmp_path / "raw-alone", tmp_path / "model" / "raw")
    params = eval_params(noise_seeds=1, steps=[1], cfg_scales=[1.0])
    both = evaluate(params, str(tmp_path / "model"), evaluator_dir, shards, tmp_path / "both", log_to_mlflow=False)
    assert both["raw"]["nfe_1"]["fid"] != both["ema"]["nfe_1"]["fid"]
    # Each figure is of the weights it is named after: the raw weights evaluated on their own give "raw"'s.
    alone = evaluate(params, str(tmp_path / "raw-alone"), evaluator_dir, shards, tmp_path / "alone",
                     log_to_mlflow=False)
    assert alone["ema"]["nfe_1"] == pytest.approx({**both["raw"]["nfe_1"],
                                                   "sec_per_image": alone["ema"]["nfe_1"]["sec_per_image"]})


def test_the_evaluator_refuses_below_min_val_accuracy(evaluator_dir, shards, tmp_path):
    achieved = json.loads((evaluator_dir / "config.json").read_text())["val_accuracy"]
    assert achieved < 1.0, "the tiny evaluator is perfect: this test needs a bar it cannot reach"
    out = tmp_path / "evaluator"
    with pytest.raises(ModelError, match=f"accuracy {achieved:.4f} is below train_evaluator.min_val_accuracy"):
        train_evaluator(tiny("train_evaluator", EvaluatorParams, min_val_accuracy=achieved + 1e-6), shards, out)
    assert not out.exists()  # nothing a later stage could pick up
    # Exactly the achieved accuracy is enough (seeded training gives the same figure again).
    train_evaluator(tiny("train_evaluator", EvaluatorParams, min_val_accuracy=achieved), shards, out)
    assert json.loads((out / "config.json").read_text())["val_accuracy"] == achieved


@pytest.mark.parametrize("spread, seeds, tolerance", [
    ([-1.0, 1.0], 2, 2 * math.sqrt(2)),                    # sd sqrt(2), x 2 x sqrt(2 / 2)
    ([-1.0, 0.0, 1.0], 3, 2 * math.sqrt(2 / 3)),           # sd 1
    ([-3.0, -1.0, 1.0, 3.0], 4, 2 * math.sqrt(20 / 3) * math.sqrt(0.5)),
])
def test_monotonicity_tolerance_is_exactly_two_sd_of_a_difference_of_means(spread, seeds, tolerance):
    def verdict(rise: float) -> dict:
        rows = [{"nfe": n, "fid": base + s} for n, base in ((1, 10.0), (2, 10.0 + rise)) for s in spread]
        return monotonicity(rows)

    at = verdict(tolerance * (1 - 1e-9))
    assert at["tolerance"] == pytest.approx(tolerance, rel=1e-12)
    assert at["fid_noise_sd"] == pytest.approx(statistics.stdev(spread), rel=1e-12)
    assert at["verdict"] is True and at["worst_step"] == "1->2"
    assert verdict(tolerance * (1 + 1e-9))["verdict"] is False
    assert verdict(-5.0)["verdict"] is True  # getting better is always fine


def test_a_real_evaluation_is_what_register_and_promote_read(eval_params, model_dir, evaluator_dir, shards,
                                                             tmp_path):
    from mlflow import MlflowClient

    from components.registry.client import RegistryParams
    from components.registry.promote import promote
    from components.registry.register import register

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)
    run_file = tmp_path / "train_run.json"
    run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "data_version": "tiny"}))
    params = eval_params(steps=[1, 2], cfg_scales=[1.0])
    result = evaluate(params, str(model_dir), evaluator_dir, shards, tmp_path / "evaluate", run_file,
                      tracking=Tracking(uri))

    registry = RegistryParams.model_validate({
        "model_name": "tim-e2e", "lock": {"settle_s": 0.1, "wait_s": 5},
        "gate": {"nfe": [1, 2], "min": {}, "min_rel_improvement": 0.0}})
    version = str(register(registry, model_dir, run_file, tmp_path / "registered.json",
                           tracking=Tracking(uri), project_dir=tmp_path)["version"])
    tags = client.get_model_version("tim-e2e", version).tags
    for n in (1, 2):  # the figures evaluate measured, as the registry read them
        assert float(tags[f"tim.eval.nfe_{n}.fid"]) == pytest.approx(result["ema"][f"nfe_{n}"]["fid"], rel=1e-5)
    decision = promote(registry, version, tracking=Tracking(uri))
    assert decision["checks"][0] == {"check": "evaluation complete", "passed": True,
                                     "detail": "every gate figure measured"}
    figures = decision["challenger"]["figures"]
    assert {n: figures[f"nfe_{n}"]["fid"] for n in (1, 2)} == {n: result["ema"][f"nfe_{n}"]["fid"] for n in (1, 2)}
    assert decision["challenger"]["monotone"] == result["monotone"]["verdict"]
    expected = "promoted" if result["monotone"]["verdict"] else "rejected"  # monotone is required by default
    assert decision["verdict"] == expected
