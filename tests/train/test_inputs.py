"""Bad input stops `train` before Ray starts: a clear TimError, and no checkpoint or export left behind."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from components.common.errors import ParamsError, ShardError, TimError, Unreachable
from components.common.tracking import Tracking
from components.train.stage import train

from .conftest import BIN, REPO, free_port, tiny_params


def _nothing_written(project):
    assert not (project / "runs").exists(), "a checkpoint folder was created before the inputs were checked"
    assert not (project / "model").exists()


def test_missing_shards(tmp_path):
    with pytest.raises(ShardError, match="index.json: not found"):
        train(tiny_params(), tmp_path / "no-shards", tmp_path / "model", project_dir=tmp_path)
    _nothing_written(tmp_path)


def test_tampered_shard_is_named(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "shards")
    tar = sorted((copy / "train").glob("*.tar"))[1]
    with tar.open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match=f"{tar.name}: sha256 mismatch"):
        train(tiny_params(), copy, tmp_path / "model", project_dir=tmp_path)
    _nothing_written(tmp_path)


def test_more_readers_than_samples(shards, tmp_path):
    with pytest.raises(ShardError, match="fewer than the"):
        train(tiny_params(distributed={"num_workers": 4}, data={"loader_workers": 64}), shards,
              tmp_path / "model", project_dir=tmp_path)


def test_unreachable_mlflow_server(shards, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match="MLflow tracking server .* is unreachable"):
        train(tiny_params(), shards, tmp_path / "model", tracking=Tracking(url, probe_timeout_s=2),
              project_dir=tmp_path)
    _nothing_written(tmp_path)


def test_unreachable_ray_address(shards, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match=f"Ray cluster at {address} is unreachable"):
        train(tiny_params(distributed={"ray_address": address, "probe_timeout_s": 2}), shards,
              tmp_path / "model", project_dir=tmp_path)
    _nothing_written(tmp_path)
    assert issubclass(Unreachable, TimError)


def test_cli_reports_a_batch_that_does_not_split(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["profile"] = "cpu-tiny"
    params["train"]["profiles"]["cpu-tiny"]["optim"]["global_batch"] = 15
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([str(BIN / "tim"), "train", "--params", "params.yaml", "--shards", "nowhere"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "optim.global_batch=15 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert issubclass(ParamsError, TimError)
    _nothing_written(tmp_path)
