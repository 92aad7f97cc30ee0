"""params.yaml loading: profiles, unknown keys and bad values fail before any work, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from components.common.errors import ParamsError
from components.common.params import load_section
from components.data.prepare import PrepareParams
from components.data.shard import ShardParams
from components.data.validate import ValidateParams

from .helpers import REPO, env_with_venv, write_params


def test_repo_params_yaml_validates_for_every_data_stage():
    for stage, schema in [("prepare", PrepareParams), ("validate", ValidateParams), ("shard", ShardParams)]:
        load_section(stage, schema, REPO / "params.yaml")


def test_misspelled_key_names_key_and_allowed(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={"sourse": "mnist5k"})
    with pytest.raises(ParamsError) as err:
        load_section("prepare", PrepareParams, path)
    assert "prepare.sourse: unknown key; allowed: source, root," in str(err.value)


def test_nested_unknown_key_lists_nested_fields(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={"s3": {"endpoint": "http://x"}})
    with pytest.raises(ParamsError, match=r"prepare\.s3\.endpoint: unknown key; allowed: endpoint_url, region"):
        load_section("prepare", PrepareParams, path)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={"channels": 2})
    with pytest.raises(ParamsError, match=r"prepare\.channels: Input should be 1 or 3 \(got 2\)"):
        load_section("prepare", PrepareParams, path)


def test_profile_deep_merges_over_base(tmp_path):
    path = write_params(
        tmp_path / "params.yaml",
        prepare={
            "seed": 3,
            "s3": {"region": "eu-west-1", "max_attempts": 2},
            "profile": "ci",
            "profiles": {"ci": {"limit": 50, "s3": {"max_attempts": 9}}, "other": {"limit": 1}},
        },
    )
    params = load_section("prepare", PrepareParams, path)
    assert (params.seed, params.limit, params.s3.region, params.s3.max_attempts) == (3, 50, "eu-west-1", 9)


def test_bad_value_inside_profile_is_reported(tmp_path):
    path = write_params(tmp_path / "params.yaml", shard={"profile": "x", "profiles": {"x": {"shard_size": 0}}})
    with pytest.raises(ParamsError, match=r"shard\.shard_size: .*greater than or equal to 1.*\n.*profile 'x'"):
        load_section("shard", ShardParams, path)


def test_unknown_profile_lists_profiles(tmp_path):
    path = write_params(tmp_path / "params.yaml", shard={"profile": "gpu", "profiles": {"cpu-tiny": {}}})
    with pytest.raises(ParamsError, match=r"shard\.profile: unknown profile 'gpu'; allowed: cpu-tiny"):
        load_section("shard", ShardParams, path)


def test_missing_section_and_file(tmp_path):
    path = write_params(tmp_path / "params.yaml", train={"steps": 1})
    with pytest.raises(ParamsError, match="no 'shard' section"):
        load_section("shard", ShardParams, path)
    with pytest.raises(ParamsError, match="file not found"):
        load_section("shard", ShardParams, tmp_path / "nope.yaml")


def test_cli_reports_params_error_without_traceback(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={"sourse": "mnist5k"})
    out = tmp_path / "prepared"
    proc = subprocess.run(
        ["tim", "prepare", "--params", str(path), "--out", str(out)],
        capture_output=True, text=True, env=env_with_venv(), timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "prepare.sourse: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_cli_import_is_light():
    code = "import sys, components.cli; print(sorted(m for m in ('great_expectations', 'webdataset', 'boto3', 'torch') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
