"""The evaluate stage end to end on a tiny model and tiny shards: outputs, honest NFE, objective-driven
sampling mode, raw-vs-EMA, MLflow logging and evaluation of a model given by a runs:/ URI."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from components.common.tracking import Tracking
from components.evaluation.evaluate import evaluate, monotonicity

from .conftest import save_tiny_model


def test_stage_writes_every_output(eval_params, model_dir, evaluator_dir, shards, tmp_path):
    params = eval_params()
    out = tmp_path / "evaluate"
    result = evaluate(params, str(model_dir), evaluator_dir, shards, out, log_to_mlflow=False)
    assert sorted(p.name for p in out.iterdir()) == ["fid_vs_nfe.png", "metrics.json", "per_nfe.csv", "samples.png"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    rows = pd.read_csv(out / "per_nfe.csv")
    assert len(rows) == params.noise_seeds * len(params.cfg_scales) * len(params.steps)
    unguided = rows[rows.cfg_scale == 1.0]
    assert list(unguided.nfe) == list(unguided.steps)  # unguided: one network call per step
    assert set(result["ema"]) == {f"nfe_{n}" for n in params.steps}
    for values in result["ema"].values():
        assert values["fid"] > 0 and 0 <= values["accuracy"] <= 1 and values["sec_per_image"] > 0
    assert result["mode"] == "transition" and result["objective"] == "tim"
    assert result["monotone"]["verdict"] in (True, False)
    # The floor uses as many validation images per class as each sample set has (the tiny split has 2).
    assert result["floor_set_size"] == 10 * min(params.samples_per_class, 2) and result["floor"]["fid"] > 0
    for name in ("fid_vs_nfe.png", "samples.png"):
        image = Image.open(out / name)
        assert image.width > 100 and len(set(image.convert("L").getdata())) > 2


def test_every_guidance_scale_is_measured_with_honest_nfe(eval_params, model_dir, evaluator_dir, shards, tmp_path):
    result = evaluate(eval_params(cfg_scales=[1.0, 2.0], noise_seeds=1, steps=[1, 3]), str(model_dir),
                      evaluator_dir, shards, tmp_path / "out", log_to_mlflow=False)
    rows = pd.read_csv(tmp_path / "out" / "per_nfe.csv")
    assert list(zip(rows.cfg_scale, rows.steps, rows.nfe)) == [(1.0, 1, 1), (1.0, 3, 3), (2.0, 1, 2), (2.0, 3, 6)]
    assert set(result["ema"]) == {"nfe_1", "nfe_3"} and result["cfg_scale"] == 1.0   # the base scale
    assert set(result["scales"]["2"]["ema"]) == {"nfe_2", "nfe_6"}                      # a guided step costs 2
    assert result["scales"]["1"]["ema"] == result["ema"]
    # Guidance changes the samples, hence the figures (same noise, same steps).
    assert result["scales"]["2"]["ema"]["nfe_2"]["fid"] != result["ema"]["nfe_1"]["fid"]
    assert result["monotone"]["verdict"] is None    # one seed: the noise is unknown, no verdict


def test_flow_matching_model_is_sampled_in_diffusion_mode(eval_params, evaluator_dir, shards, tmp_path):
    save_tiny_model(tmp_path / "fm", objective="fm")
    result = evaluate(eval_params(noise_seeds=1, steps=[2]), str(tmp_path / "fm"), evaluator_dir, shards,
                      tmp_path / "out", log_to_mlflow=False)
    assert result["objective"] == "fm" and result["mode"] == "diffusion"


def test_raw_weights_beside_the_ema_export_are_evaluated_too(eval_params, evaluator_dir, shards, tmp_path):
    save_tiny_model(tmp_path / "model", objective="tim")
    save_tiny_model(tmp_path / "model" / "raw", objective="tim")   # the train stage's layout: raw/ inside
    result = evaluate(eval_params(noise_seeds=1, steps=[1], cfg_scales=[1.0]), str(tmp_path / "model"),
                      evaluator_dir, shards, tmp_path / "out", log_to_mlflow=False)
    assert set(result) >= {"ema", "raw"}
    assert sorted(pd.read_csv(tmp_path / "out" / "per_nfe.csv").weights) == ["ema", "raw"]
    # The same weights in both places: the same numbers.
    assert result["raw"]["nfe_1"]["fid"] == result["ema"]["nfe_1"]["fid"]


def test_monotonicity_judges_increases_against_the_seed_noise():
    rows = [{"nfe": n, "fid": f} for n, fids in {1: (10, 12), 2: (8, 9), 4: (9.5, 9.5)}.items() for f in fids]
    verdict = monotonicity(rows)
    # Pooled seed variance: mean of 2, 0.5, 0 = 5/6; the mean of 2 -> 4 rises by 1.0 < 2 sqrt(5/6) = 1.83.
    assert verdict["verdict"] is True and verdict["worst_step"] == "2->4"
    assert verdict["fid_noise_sd"] == pytest.approx((5 / 6) ** 0.5)
    rows[-1]["fid"] = rows[-2]["fid"] = 20.0
    assert monotonicity(rows)["verdict"] is False


def test_model_by_runs_uri_is_downloaded_evaluated_and_logged(eval_params, model_dir, evaluator_dir, shards,
                                                              tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    result = evaluate(eval_params(), f"runs:/{run_id}/model", evaluator_dir, shards, tmp_path / "out",
                      tracking=Tracking(uri))
    run = client.get_run(run_id)
    assert run.data.metrics["eval/ema/fid"] == pytest.approx(result["ema"][f"nfe_{max(eval_params().steps)}"]["fid"])
    history = client.get_metric_history(run_id, "eval/ema/fid")
    assert sorted(m.step for m in history) == eval_params().steps   # FID against NFE, as steps
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/metrics.json" in logged and "evaluation/fid_vs_nfe.png" in logged

    # The same model through the registry, by alias: same samples, same numbers.
    client.create_registered_model("tim-eval-test")
    version = client.create_model_version("tim-eval-test", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("tim-eval-test", "champion", version.version)
    by_alias = evaluate(eval_params(), "models:/tim-eval-test@champion", evaluator_dir, shards, tmp_path / "out2",
                        tracking=Tracking(uri), log_to_mlflow=False)
    assert {k: v["fid"] for k, v in by_alias["ema"].items()} == {k: v["fid"] for k, v in result["ema"].items()}


def test_unknown_uri_and_missing_evaluator_are_clear_cli_errors(model_dir, evaluator_dir, shards, tmp_path):
    cmd = [sys.executable, "-m", "components.cli", "evaluate", "--shards", str(shards), "--out", str(tmp_path / "o")]
    res = subprocess.run([*cmd, "--model", str(model_dir), "--evaluator", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "run `tim train-evaluator` first" in res.stderr
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    res = subprocess.run([*cmd, "--model", "runs:/0123456789abcdef/model", "--evaluator", str(evaluator_dir)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "runs:/0123456789abcdef/model: cannot download" in res.stderr
    assert not (tmp_path / "o").exists()
