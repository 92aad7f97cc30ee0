"""The evaluator stage on a tiny subset: trains, records its validation accuracy, reloads identically."""

import json
import subprocess
import sys

import torch

from components.data.reader import load_split
from components.evaluation.feature_net import load_evaluator


def test_evaluator_trains_saves_and_reloads(evaluator_dir, shards):
    config = json.loads((evaluator_dir / "config.json").read_text())
    assert 0.0 <= config["val_accuracy"] <= 1.0
    assert config["num_classes"] == 10 and config["input_size"] == [28, 28] and len(config["data_version"]) == 64
    model, loaded = load_evaluator(evaluator_dir)
    x, y = load_split(shards, "val")
    features = model.features(x)
    assert features.shape == (len(x), config["feature_dim"])
    # Reloaded weights reproduce the recorded validation accuracy exactly.
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).double().mean()) == config["val_accuracy"]


def test_missing_shards_is_a_clear_cli_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "components.cli", "train-evaluator", "--shards", str(tmp_path / "no"),
                          "--out", str(tmp_path / "ev")], capture_output=True, text=True)
    assert res.returncode == 2 and "index.json: not found" in res.stderr
    assert not (tmp_path / "ev").exists()
