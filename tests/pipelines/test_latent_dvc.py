"""The latent path end to end, as a user runs it: `tim standin-vae` writes a random-weight VAE where the
`latent-tiny` profile of params.yaml expects one, then `dvc repro` runs the whole pipeline on cpu-tiny sizes
(encode -> train on 14x14x4 latents -> samples -> evaluate -> register -> promote), and `tim generate` samples
the registered version through its pyfunc: every picture on the way is decoded to 28x28 digits-sized images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from PIL import Image

from tests.pipelines.conftest import REPO, tim
from tests.services import BIN

STAGES = {"fingerprint", "prepare", "validate", "shard", "encode", "train", "samples", "train_evaluator",
          "evaluate", "register", "promote"}


def dvc(*args: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=840,
                          env={**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"})
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_latent_profile_through_dvc_repro_and_the_registered_model(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    for package in ("components", "tim_core"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section in params.values():   # cpu-tiny sizes everywhere, the stand-in VAE for encode
        if isinstance(section, dict) and "cpu-tiny" in section.get("profiles", {}):
            section["profile"] = "cpu-tiny"
    params["encode"]["profile"] = "latent-tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    made = tim("standin-vae", "--out", params["encode"]["profiles"]["latent-tiny"]["vae"], cwd=repo)
    assert made.returncode == 0, made.stderr
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q", cwd=repo)

    out = dvc("repro", cwd=repo)
    assert {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")} == STAGES

    index = json.loads((repo / "data/encoded/index.json").read_text())
    assert index["encoding"]["space"] == "latent" and index["latent"]["channels"] == 4
    vae = index["latent"]["vae"]["sha256"]
    config = json.loads((repo / "models/tim/config.json").read_text())
    assert config["latent"] == index["latent"] and config["model"]["in_channels"] == 4
    assert config["model"]["input_size"] == [14, 14] and (repo / "models/tim/vae/config.json").is_file()

    # The sample grid: 10 class rows of 28 px images (decoded), under a 14 px label: 14 + 10 x 29 + 1.
    assert Image.open(repo / "runs/samples/grid.png").height == 305
    metrics = json.loads((repo / "runs/evaluate/metrics.json").read_text())
    assert set(metrics["ema"]) == {"nfe_1", "nfe_2", "nfe_4"}

    from mlflow import MlflowClient

    run = json.loads((repo / "models/train_run.json").read_text())
    tags = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).data.tags
    assert tags["tim.data.space"] == "latent" and tags["tim.vae.sha256"] == vae

    registered = json.loads((repo / "models/registered.json").read_text())
    made = tim("generate", "--model", registered["model_uri"], "--label", "3", "--nfe", "2", "--num-images", "3",
               "--out", "three.png", cwd=repo, env={"MLFLOW_TRACKING_URI": ""})
    assert made.returncode == 0, made.stderr
    picture = Image.open(repo / "three.png")
    assert picture.size == (3 * 28, 28) and picture.mode == "L"
