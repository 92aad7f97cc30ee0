"""The source fingerprint (components/data/fingerprint.py): it changes exactly when the data `prepare` would read
changes (folder bytes, S3 keys/sizes/ETags, mnist5k's package), and `dvc repro` reruns `prepare` on it."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import boto3
import pytest
import yaml

from components.common.errors import DataError, Unreachable
from components.data import fingerprint as fp
from components.data.fingerprint import fingerprint
from components.data.prepare import PrepareParams, S3Params
from tests.pipelines.conftest import REPO, make_image_folder, tim
from tests.services import BIN, free_port


def flipped(data: bytes) -> bytes:
    """The same number of bytes, one of them different."""
    return data[:-1] + bytes([data[-1] ^ 1])


def test_folder_fingerprint_follows_the_bytes_prepare_reads(tmp_path):
    root = make_image_folder(tmp_path / "raw", per_class=3)
    params = PrepareParams(source="imagefolder", root=str(root))
    first = fingerprint(params)
    assert first == fingerprint(params) and first["items"] == 9
    (root / ".DS_Store").write_bytes(b"not data")            # hidden: prepare skips it, so does the digest
    assert fingerprint(params)["digest"] == first["digest"]
    image = sorted((root / "cat").iterdir())[0]
    image.write_bytes(flipped(image.read_bytes()))          # same name, class and size, other bytes
    changed = fingerprint(params)
    assert changed["digest"] != first["digest"]
    image.rename(image.with_name("renamed" + image.suffix))
    assert fingerprint(params)["digest"] not in (first["digest"], changed["digest"])
    with pytest.raises(DataError, match="image folder not found"):
        fingerprint(PrepareParams(source="imagefolder", root=str(tmp_path / "none")))


def test_mnist5k_fingerprint_is_the_package_that_ships_the_digits(monkeypatch):
    result = fingerprint(PrepareParams())
    assert result["source"] == "mnist5k" and result["items"] == 1
    assert result == fingerprint(PrepareParams(limit=200))   # params are the stage's concern, not the source's
    monkeypatch.setattr(fp, "installed", lambda name: version(name) + ".post1")  # another mlxtend release
    assert fingerprint(PrepareParams())["digest"] != result["digest"]


def test_s3_fingerprint_lists_keys_sizes_and_etags(aws_env, tmp_path):
    client = boto3.client("s3", endpoint_url=aws_env)
    client.create_bucket(Bucket="fp-source")
    folder = make_image_folder(tmp_path / "raw", per_class=2)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), "fp-source", f"v1/{path.relative_to(folder).as_posix()}")
    params = PrepareParams(source="s3", root="s3://fp-source/v1", s3=S3Params(endpoint_url=aws_env))
    first = fingerprint(params)
    assert first["items"] == 6 and fingerprint(params) == first
    original = client.get_object(Bucket="fp-source", Key="v1/cat/000.png")["Body"].read()
    client.put_object(Bucket="fp-source", Key="v1/cat/000.png", Body=flipped(original))  # same key and size
    assert fingerprint(params)["digest"] != first["digest"]
    with pytest.raises(DataError, match="bucket does not exist"):
        fingerprint(PrepareParams(source="s3", root="s3://no-such-bucket/x", s3=S3Params(endpoint_url=aws_env)))
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match="unreachable"):
        fingerprint(PrepareParams(source="s3", root="s3://fp-source/v1",
                                  s3=S3Params(endpoint_url=closed, max_attempts=1)))


def test_cli_writes_the_same_file_for_the_same_source(tmp_path):
    root = make_image_folder(tmp_path / "raw", per_class=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"source": "imagefolder", "root": str(root)}}))
    outs = []
    for name in ("a.json", "b.json"):
        res = tim("fingerprint", "--out", name, cwd=tmp_path, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and b"digest" in outs[0]
    res = tim("fingerprint", "--set", "prepare.root=/nowhere", cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "error: /nowhere: image folder not found" in res.stderr


def _sh(*args: str, cwd: Path) -> str:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(cwd)}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_dvc_repro_reruns_prepare_exactly_when_the_source_changes(tmp_path):
    """dvc.yaml's own fingerprint and prepare stages, in a scratch DVC project reading an image folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: stages[s] for s in ("fingerprint", "prepare")}}))
    for dep in {d for s in ("fingerprint", "prepare") for d in stages[s]["deps"] if (REPO / d).exists()}:
        copy = shutil.copytree if (REPO / dep).is_dir() else shutil.copy
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / dep, repo / dep)
    folder = make_image_folder(tmp_path / "raw", per_class=2)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root=str(folder))
    (repo / "params.yaml").write_text(yaml.safe_dump({"prepare": params["prepare"]}))
    _sh("dvc", "init", "--no-scm", "-q", cwd=repo)

    assert _ran(_sh("dvc", "repro", "prepare", cwd=repo)) == {"fingerprint", "prepare"}
    assert _ran(_sh("dvc", "repro", "prepare", cwd=repo)) == {"fingerprint"}   # always computed, unchanged
    image = sorted((folder / "dog").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert _ran(_sh("dvc", "repro", "prepare", cwd=repo)) == {"fingerprint", "prepare"}
