"""The training RayJob: the template in infra/k8s/rayjob and what pipelines/rayjob.py renders from parameters are
checked against rayjob.schema.json (additionalProperties: false everywhere) and, for the pods inside, against
the Kubernetes 1.32 schemas; a misspelled field fails both."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipelines.rayjob import (
    MAX_NAME_LENGTH, RayJobError, load_schema, load_template, render_rayjob, schema_errors, train_entrypoint,
)
from tests.infra.manifests import RAYJOB_DIR, ROOT, pod_spec, rayjob_pods
from tests.infra.test_kustomize import check_pod_rules, kubernetes_validate

PARAMS = dict(name="tim-train-1", namespace="tim", image="registry.example.com/tim-pipeline:0.1.0-gpu",
              entrypoint=["tim", "train", "--profile", "gpu", "--set", "train.distributed.num_workers=8"],
              workers=2, gpus_per_worker=4, cpus_per_worker=32, memory_per_worker="256Gi",
              mlflow_tracking_uri="http://mlflow:5000", mlflow_secret="mlflow-client", s3_secret="tim-s3")


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pipeline"]
    return next(re.search(r"==([0-9.]+)", d).group(1) for d in deps if re.match(r"ray\[", d))


def env_of(container):
    return {e["name"]: e for e in container["env"]}


def test_schema_is_a_valid_draft_2020_12_schema_and_closed_everywhere():
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)

    def walk(node, path="$"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{path}: additionalProperties is not false"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema)


def test_template_matches_the_schema(template_job):
    assert schema_errors(template_job) == []


def test_template_follows_the_pins_and_the_issue(template_job):
    spec = template_job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin() == "2.60.0"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert 0 <= spec["submitterConfig"]["backoffLimit"] <= 5
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert worker["nodeSelector"] and worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = next(v for v in worker["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    env = env_of(container)
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD"} <= env.keys()


@pytest.mark.parametrize("field, path", [
    ("shutdownAfterJobFinish", ["spec"]),                                          # misspelled top-level field
    ("ttlSecondAfterFinished", ["spec"]),
    ("resource", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0]),
    ("nodeSelecter", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec"]),
])
def test_a_misspelled_field_fails_the_schema(template_job, field, path):
    job = json.loads(json.dumps(template_job))
    node = job
    for key in path:
        node = node[key]
    node[field] = {} if field.startswith("node") or field == "resource" else 1
    errors = schema_errors(job)
    assert any("Additional properties are not allowed" in e and f"'{field}'" in e for e in errors), errors


def test_render_refuses_a_template_with_a_misspelled_field(tmp_path):
    text = (RAYJOB_DIR / "rayjob.yaml").read_text().replace("shutdownAfterJobFinishes:", "shutdownAfterJobFinish:")
    (tmp_path / "rayjob.yaml").write_text(text)
    shutil.copy(RAYJOB_DIR / "rayjob.schema.json", tmp_path)
    with pytest.raises(RayJobError, match="'shutdownAfterJobFinish' was unexpected"):
        render_rayjob(**PARAMS, template_dir=tmp_path)


def test_render_fills_in_the_parameters():
    job = render_rayjob(**PARAMS, node_selector={"pool": "h100"},
                        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        shm_size="64Gi", env={"NCCL_IB_DISABLE": "1", "NCCL_DEBUG": "INFO"},
                        labels={"pipelines.kubeflow.org/run": "abc"}, active_deadline_seconds=3600,
                        ttl_seconds_after_finished=60, submitter_backoff_limit=1)
    assert schema_errors(job) == []
    meta, spec = job["metadata"], job["spec"]
    assert (meta["name"], meta["namespace"]) == ("tim-train-1", "tim")
    assert meta["labels"]["pipelines.kubeflow.org/run"] == "abc"
    assert shlex.split(spec["entrypoint"]) == PARAMS["entrypoint"]
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (3600, 60)
    assert spec["submitterConfig"]["backoffLimit"] == 1
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]
    assert worker["nodeSelector"] == {"pool": "h100"}
    assert worker["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    container = worker["containers"][0]
    for side in ("requests", "limits"):
        assert container["resources"][side] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 4}
    assert next(v for v in worker["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "64Gi"
    for pod in rayjob_pods(job):
        assert pod_spec(pod)["containers"][0]["image"] == PARAMS["image"]
    for template in (spec["rayClusterSpec"]["headGroupSpec"]["template"], group["template"]):
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client",
                                                                               "key": "password"}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tim-s3"
        assert env["NCCL_DEBUG"]["value"] == "INFO" and env["NCCL_IB_DISABLE"]["value"] == "1"
    # The template on disk is untouched by rendering (a fresh copy each time).
    assert load_template()["metadata"]["name"] == "tim-train"


def test_cpu_render_drops_the_gpu_scheduling(rendered_jobs):
    worker = rendered_jobs["cpu"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    spec = worker["template"]["spec"]
    assert worker["groupName"] == "cpu"
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert "--set train.distributed.use_gpu=false" in rendered_jobs["cpu"]["spec"]["entrypoint"]


def test_train_entrypoint_is_the_tim_cli():
    cmd = train_entrypoint(2, 4, 32, sets=["train.distributed.storage_path=s3://tim-runs/train"],
                           args=["--shards", "/data/shards"])
    assert cmd[:6] == ["tim", "train", "--params", "/opt/tim/params.yaml", "--profile", "gpu"]
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    assert sets == ["train.distributed.num_workers=8", "train.distributed.cpus_per_worker=8",
                    "train.distributed.use_gpu=true", "train.distributed.storage_path=s3://tim-runs/train"]
    assert cmd[-2:] == ["--shards", "/data/shards"]


@pytest.mark.parametrize("change, message", [
    ({"name": "x" * (MAX_NAME_LENGTH + 1)}, "name must be a lower-case DNS label"),
    ({"name": "Tim_Train"}, "name must be"),
    ({"image": "tim-pipeline:latest"}, "explicit tag other than latest"),
    ({"image": "registry:5000/tim-pipeline"}, "explicit tag"),
    ({"entrypoint": "tim train"}, "entrypoint must be a non-empty list"),
    ({"entrypoint": []}, "entrypoint must be a non-empty list"),
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"gpus_per_worker": -1}, "gpus_per_worker must be an integer >= 0"),
    ({"cpus_per_worker": "lots"}, "cpus_per_worker must be a Kubernetes quantity"),
    ({"memory_per_worker": "0Gi"}, "memory_per_worker must be more than zero"),
    ({"mlflow_tracking_uri": "sqlite:///mlruns.db"}, "mlflow_tracking_uri must be the server's http"),
    ({"s3_secret": "Not A Name"}, "s3_secret must be"),
    ({"submitter_backoff_limit": 50}, "submitter_backoff_limit must be an integer from 0 to 5"),
    ({"env": {"MLFLOW_TRACKING_PASSWORD": "x"}}, "is set from mlflow_tracking_uri"),
])
def test_render_rejects_bad_parameters(change, message):
    with pytest.raises(RayJobError, match=re.escape(message)):
        render_rayjob(**{**PARAMS, **change})


@pytest.mark.parametrize("which", ["template", "gpu", "cpu"])
def test_rayjob_pods_validate_strictly_against_kubernetes_and_keep_the_rules(which, template_job, rendered_jobs,
                                                                          tmp_path):
    job = template_job if which == "template" else rendered_jobs[which]
    pods = rayjob_pods(job)
    code, out = kubernetes_validate(pods, tmp_path, which)
    assert code == 0, out
    assert out.count(" passed for resource ") == len(pods), out
    problems = [p for pod in pods for p in check_pod_rules(pod["metadata"]["name"], pod_spec(pod))]
    assert not problems, "\n".join(problems)


def test_a_misspelled_pod_field_fails_the_kubernetes_schema_too(template_job, tmp_path):
    job = json.loads(json.dumps(template_job))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    code, out = kubernetes_validate(rayjob_pods(job), tmp_path, "broken")
    assert code != 0 and "'volumeMount' was unexpected" in out, out


def test_template_is_found_from_an_installed_package(tmp_path):
    """A non-editable install has pipelines/ in site-packages without infra/: TIM_RAYJOB_DIR (set by the image)
    finds the template; without it the error says what to set."""
    site = tmp_path / "site-packages"
    (site / "pipelines").mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "rayjob.py", site / "pipelines" / "rayjob.py")
    (site / "pipelines" / "__init__.py").write_text("")
    code = ("from pipelines.rayjob import render_rayjob; import json, sys; "
            f"job = render_rayjob(**json.loads(sys.argv[1])); print(job['metadata']['name'])")
    env = {k: v for k, v in os.environ.items() if k != "TIM_RAYJOB_DIR"}
    env["PYTHONPATH"] = str(site)

    def run(extra):
        return subprocess.run([sys.executable, "-c", code, json.dumps(PARAMS)], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=60)

    found = run({"TIM_RAYJOB_DIR": str(RAYJOB_DIR)})
    assert found.returncode == 0 and found.stdout.strip() == "tim-train-1", found.stderr
    missing = run({})
    assert missing.returncode != 0 and "set $TIM_RAYJOB_DIR" in missing.stderr, missing.stderr


def test_template_yaml_is_the_one_the_image_ships():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "COPY infra/k8s/rayjob/ infra/k8s/rayjob/" in dockerfile
    assert "TIM_RAYJOB_DIR=/opt/tim/infra/k8s/rayjob" in dockerfile
    assert yaml.safe_load((RAYJOB_DIR / "rayjob.yaml").read_text())["kind"] == "RayJob"
    assert Path(RAYJOB_DIR / "rayjob.schema.json").is_file()
