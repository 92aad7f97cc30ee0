"""A real moto S3 server on 127.0.0.1 as the `s3` prepare source and as a DVC remote; `dvc repro` in a
temporary git+dvc repository: full run, no-op rerun, and a param change rerunning only its dependants.
Targets are `shard` (with its upstream stages): later stages in dvc.yaml belong to other tests."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml

from components.common.errors import DataError
from components.data import prepare
from components.data.prepare import PrepareParams, S3Params

from .helpers import REPO, env_with_venv, leftovers, make_image_folder


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture
def s3_images(aws_env, tmp_path):
    client = boto3.client("s3", endpoint_url=aws_env)
    bucket = f"raw-{tmp_path.name.lower().replace('_', '-')}"[:60]
    client.create_bucket(Bucket=bucket)
    upload_folder(client, make_image_folder(tmp_path / "raw", per_class=6), bucket, "images/v1")
    return bucket


def test_s3_source_reads_class_folders(aws_env, s3_images, tmp_path):
    params = PrepareParams(
        source="s3", root=f"s3://{s3_images}/images/v1", resolution=16, s3=S3Params(endpoint_url=aws_env, retry_mode="adaptive")
    )
    out = prepare.prepare(params, tmp_path / "prepared")
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 18 and set(manifest["class_name"]) == {"cat", "dog", "owl"}
    assert manifest["source"].str.startswith(f"s3://{s3_images}/images/v1/").all()


@pytest.mark.parametrize(
    "root,match",
    [
        ("s3://{bucket}/images/v2", r"s3://{bucket}/images/v2/: no objects under this prefix"),
        ("s3://no-such-bucket-x/images", r"s3://no-such-bucket-x: bucket does not exist"),
        ("s3://{bucket}/images/v1", r"s3://{bucket}/images/v1/emu: empty class folder"),
    ],
)
def test_s3_missing_prefix_bucket_or_empty_class_is_named(aws_env, s3_images, tmp_path, root, match):
    # a "folder" made in the S3 console is a zero-byte key ending in "/"
    boto3.client("s3", endpoint_url=aws_env).put_object(Bucket=s3_images, Key="images/v1/emu/", Body=b"")
    params = PrepareParams(source="s3", root=root.format(bucket=s3_images), s3=S3Params(endpoint_url=aws_env))
    with pytest.raises(DataError, match=match.format(bucket=s3_images)):
        prepare.prepare(params, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- DVC


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env_with_venv(), timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_dvc_repro_and_s3_remote(aws_env, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@example.com")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("fingerprint", "prepare", "validate", "shard"):  # the stages' declared code deps
        for dep in stages[stage]["deps"]:
            source = REPO / dep
            if source.is_dir() and not (repo / dep).exists():
                shutil.copytree(source, repo / dep, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.is_file():
                (repo / dep).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, repo / dep)
        if stage != "fingerprint":  # it reads the prepare section
            set_param(repo, stage, "profile", "cpu-tiny")
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)

    # `fingerprint` (always_changed) hashes the source on every repro; its unchanged output stops the rest.
    assert ran(sh("dvc", "repro", "shard", cwd=repo)) == {"fingerprint", "prepare", "validate", "shard"}
    assert ran(sh("dvc", "repro", "shard", cwd=repo)) == {"fingerprint"}
    set_param(repo, "shard", "seed", 7)
    assert ran(sh("dvc", "repro", "shard", cwd=repo)) == {"fingerprint", "shard"}
    set_param(repo, "validate", "max_examples", 3)  # validate reruns; its gate output is unchanged
    assert ran(sh("dvc", "repro", "shard", cwd=repo)) == {"fingerprint", "validate"}

    client = boto3.client("s3", endpoint_url=aws_env)
    client.create_bucket(Bucket="dvc-remote")
    sh("dvc", "remote", "add", "-d", "storage", "s3://dvc-remote/cache", cwd=repo)
    sh("dvc", "remote", "modify", "storage", "endpointurl", aws_env, cwd=repo)
    sh("dvc", "push", "--with-deps", "shard", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "pull", "--with-deps", "shard", cwd=clone)  # fresh clone: empty cache, everything comes from the S3 remote
    for out in ("data/prepared", "data/validated", "data/shards"):
        assert tree_digest(clone / out) == tree_digest(repo / out)
    assert ran(sh("dvc", "repro", "shard", cwd=clone)) == {"fingerprint"}
