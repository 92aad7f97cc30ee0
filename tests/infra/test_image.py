"""The image: hadolint passes on the Dockerfile, its pins agree with the project's, the build context admits only
code, and `make image` fails with a clear message where no Docker engine runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.infra.manifests import DOCKERFILE, ROOT, run, tool

TEXT = DOCKERFILE.read_text()


def arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", TEXT, re.M).group(1)


def test_hadolint_passes():
    result = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu\nRUN apt-get install -y curl\nRUN pip install requests\n")
    result = run([tool("hadolint"), str(broken)])
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013"):
        assert rule in result.stdout, result.stdout


def test_base_images_are_pinned_to_exact_tags():
    images = re.findall(r"^FROM (\S+)", TEXT, re.M)
    external = [i for i in images if not i.startswith("base-")]
    assert external == ["nvidia/cuda:13.0.2-runtime-ubuntu24.04", "ubuntu:noble-20250925",
                        "ghcr.io/astral-sh/uv:0.9.18"]
    for image in external:
        assert re.search(r":[0-9a-z.-]*[0-9][0-9a-z.-]*$", image) and not image.endswith(":latest"), image
    assert "FROM base-${VARIANT}" in TEXT and arg("VARIANT") == "gpu"


def test_versions_agree_with_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pipeline = project["optional-dependencies"]["pipeline"]
    assert f"mlflow=={arg('MLFLOW_VERSION')}" in pipeline
    assert f"torch=={arg('TORCH_VERSION')}" in (ROOT / "constraints.txt").read_text().split()
    assert f"TORCH_SPEC ?= torch=={arg('TORCH_VERSION')}" in (ROOT / "Makefile").read_text()
    assert project["requires-python"].startswith(">=3.11") and arg("PYTHON_VERSION").startswith("3.11.")
    # torch before the project, the project with constraints.txt and its pipeline extras
    torch_at = TEXT.index('"torch==${TORCH_VERSION}"')
    assert torch_at < TEXT.index('pip install --no-cache-dir -c constraints.txt ".[pipeline]"')


def test_runs_as_the_non_root_uid_of_the_manifests(rendered):
    assert arg("UID") == "10001"
    users = re.findall(r"^USER (\S+)$", TEXT, re.M)
    assert users == ["${UID}:${UID}"]
    for objects in rendered.values():
        for obj in objects:
            spec = obj.get("spec", {}).get("template", {}).get("spec")
            if spec and "tim-pipeline" in spec["containers"][0]["image"]:
                assert spec["securityContext"]["runAsUser"] == 10001, obj["metadata"]["name"]


def test_no_secrets_or_data_baked_in():
    for line in re.findall(r"^(?:ENV|ARG|LABEL)\b.*$", TEXT, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", line, re.I), line
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", TEXT, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
            assert not re.match(r"(data|runs|models|mlruns|mlartifacts|\.dvc|\.venv)\b", path), path


def dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents decides."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    admitted = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(regex(pattern).match(c) for c in candidates):
            admitted = negate
    return admitted


def test_dockerignore_admits_only_code_and_config():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything out, then the few paths the image needs"
    for path in ["pyproject.toml", "constraints.txt", "README.md", "params.yaml", "tim_core/model.py",
                 "components/cli.py", "pipelines/rayjob.py", "infra/k8s/rayjob/rayjob.yaml",
                 "infra/k8s/rayjob/rayjob.schema.json"]:
        assert dockerignore_admits(path, patterns), path
    for path in ["data/raw/x.png", "data/shards/train/0.tar", "runs/samples/grid.png", "models/tim/model.safetensors",
                 "mlruns.db", "mlartifacts/1/a", ".venv/bin/python", "infra/.tools-venv/bin/checkov",
                 ".git/config", ".dvc/config.local", ".env", "secrets/tim-s3.env", "dvc.lock",
                 "components/__pycache__/cli.cpython-311.pyc", "pipelines/compiled/tim.yaml",
                 "infra/k8s/overlays/dev/kustomization.yaml", "tests/conftest.py", "benchmarks/results/a.md"]:
        assert not dockerignore_admits(path, patterns), path
    # every COPY source is in the context
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", TEXT, re.M):
        for path in source.split():
            probe = path.rstrip("/") + ("/x.py" if path.endswith("/") else "")
            assert dockerignore_admits(probe, patterns), path


def test_make_image_fails_clearly_without_docker(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is needed for `make image`")
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([make, "--no-print-directory", "image"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": str(empty), "HOME": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    assert "make image: the docker command is not installed here" in result.stderr, result.stderr


def test_make_image_fails_clearly_without_a_docker_engine(tmp_path):
    """A docker client that cannot reach an engine (as on this machine): the message says so."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    result = subprocess.run([shutil.which("make"), "--no-print-directory", "image"], cwd=ROOT, capture_output=True,
                            text=True, env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    assert "no Docker engine answers" in result.stderr, result.stderr
    assert Path(ROOT / "infra" / "docker" / "Dockerfile").is_file()
