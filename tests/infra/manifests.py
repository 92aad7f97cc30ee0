"""Helpers of the infra checks: where the tools are, rendering the overlays, walking pod specs, the RayJob's pods."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
RAYJOB_DIR = K8S / "rayjob"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
OVERLAYS = {"dev": "kubeflow", "prod": "tim"}   # overlay -> its namespace
K8S_VERSION = "1.32.0"
# Kinds that carry a pod template, and where it is.
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def tools_bin() -> Path:
    """bin/ of the scanners' venv (make tools); TIM_INFRA_TOOLS points at another venv."""
    return Path(os.environ.get("TIM_INFRA_TOOLS", INFRA / ".tools-venv")) / "bin"


def tool(name: str) -> str:
    path = tools_bin() / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools` (installs infra/tools-requirements.txt into "
                    f"infra/.tools-venv); `make test` does it first")
    return str(path)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: it renders the kustomize overlays (`kubectl kustomize`)")
    return path


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd or ROOT)


def render_overlay(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one overlay (offline: local bases only), as a list of objects."""
    result = run([kubectl(), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, as kubectl writes them (folded quoted strings look like noise)."""


_BlockDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                                       style="|" if "\n" in value else None))


def dump_all(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in POD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that runs pods."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec


def rayjob_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pods a RayJob makes, as plain Kubernetes objects (head and workers as Pods, the submitter as a Job):
    what KubeRay creates from the templates, so that the Kubernetes schemas and checkov see them."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]

    def pod(suffix: str, template: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{suffix}", "namespace": namespace,
                             "labels": template["metadata"].get("labels", {})},
                "spec": template["spec"]}

    out = [pod("head", cluster["headGroupSpec"]["template"])]
    for group in cluster["workerGroupSpecs"]:
        out.append(pod(f"worker-{group['groupName']}", group["template"]))
    submitter = spec["submitterPodTemplate"]
    out.append({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": f"{name}-submitter", "namespace": namespace,
                             "labels": submitter["metadata"].get("labels", {})},
                "spec": {"backoffLimit": spec["submitterConfig"]["backoffLimit"], "template": submitter}})
    return out


def example_rayjobs() -> dict[str, dict[str, Any]]:
    """The RayJob rendered from parameters as the pipeline would: GPU (prod) and CPU (dev)."""
    from pipelines.rayjob import render_rayjob, train_entrypoint

    gpu = render_rayjob(
        name="tim-train-gpu", namespace=OVERLAYS["prod"], image="registry.example.com/tim-pipeline:0.1.0-gpu",
        entrypoint=train_entrypoint(2, 4, 32, sets=["train.distributed.storage_path=s3://tim-runs/train"]),
        workers=2, gpus_per_worker=4, cpus_per_worker=32, memory_per_worker="256Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        shm_size="64Gi", env={"NCCL_IB_DISABLE": "0"},
        mlflow_tracking_uri="http://mlflow.tim.svc.cluster.local:5000", mlflow_secret="mlflow-client",
        s3_secret="tim-s3")
    cpu = render_rayjob(
        name="tim-train-cpu", namespace=OVERLAYS["dev"], image="tim-pipeline:0.1.0-cpu",
        entrypoint=train_entrypoint(2, 0, 2, profile="cpu"),
        workers=2, gpus_per_worker=0, cpus_per_worker=2, memory_per_worker="4Gi", shm_size="1Gi",
        mlflow_tracking_uri="http://mlflow:5000", mlflow_secret="mlflow-client", s3_secret="tim-s3")
    return {"gpu": gpu, "cpu": cpu}
