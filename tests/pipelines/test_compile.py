"""The compiled pipeline: the committed YAML is what the code compiles to, every stage is a task in the image
given at compile time, the run form has its parameters with defaults and descriptions, credentials come from
Secrets by name only, caching is on exactly for the data tasks, and the KubeRay RayJob a run would create
renders and validates offline."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from pipelines.kfp_client import form_of, images_of, read_package
from pipelines.pipeline import COMPILED, compile_to
from tests.pipelines.conftest import project_copy, tim

TASKS = {"fingerprint", "prepare", "validate", "shard", "encode", "plan", "train-in-pod", "train-ray-jobs",
         "train-kuberay", "train-evaluator", "samples", "evaluate", "register", "promote"}
FORM = {"data_source", "data_root", "params_profile", "params_set", "force_train", "train_mode", "ray_address",
        "ray_workers", "gpus_per_worker", "zero_stage", "worker_memory", "node_selector", "tolerations",
        "init_from", "nfe_list", "gate", "model_name", "mlflow_tracking_uri", "mlflow_secret", "s3_secret",
        "ray_token_secret"}


@pytest.fixture(scope="module")
def committed():
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks_of(spec) -> dict[str, dict]:
    """Every task of every DAG (the root's and the sub-DAGs'), by task name."""
    out = {}
    for dag in [spec["root"], *spec["components"].values()]:
        out.update(dag.get("dag", {}).get("tasks", {}))
    return out


def test_committed_yaml_is_what_the_code_compiles(committed, tmp_path):
    spec, _ = committed
    (image,) = images_of(spec)
    fresh = compile_to(tmp_path / "tim.yaml", image)
    assert fresh.read_text() == COMPILED.read_text(), (
        f"pipelines/compiled/tim.yaml is out of date: run `tim pipeline compile --image {image}` and commit it")


def test_every_stage_is_a_task_of_the_compile_time_image(committed, tmp_path):
    spec, _ = committed
    names = {re.sub(r"-\d+$", "", name) for name in tasks_of(spec)}
    assert TASKS <= names
    for executor in spec["deploymentSpec"]["executors"].values():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert env["TIM_PARAMS"] == "/opt/tim/params.yaml"
        # The component body is one call into pipelines.tasks: no stage logic in the YAML.
        body = executor["container"]["command"][-1]
        assert "from pipelines import tasks" in body and "tim " not in body.split("def ", 1)[0]
    other = read_package(compile_to(tmp_path / "other.yaml", "registry.example.com/tim-pipeline:9.9.9-cpu"))
    assert images_of(other) == {"registry.example.com/tim-pipeline:9.9.9-cpu"}


def test_the_run_form_has_its_parameters_with_defaults_and_descriptions(committed):
    spec, _ = committed
    form = form_of(spec)
    assert FORM <= set(form)
    for name in FORM:
        assert "defaultValue" in form[name] and len(form[name].get("description", "")) > 20, name
    assert form["train_mode"]["defaultValue"] == "in_pod" and form["mlflow_secret"]["defaultValue"] == "mlflow-client"
    assert form["gpus_per_worker"]["parameterType"] == "NUMBER_INTEGER" and form["gate"]["parameterType"] == "STRUCT"
    assert form["nfe_list"]["parameterType"] == "LIST" and form["force_train"]["defaultValue"] is False


def test_credentials_come_from_secrets_named_on_the_form(committed):
    spec, executors = committed
    for name in ("exec-plan", "exec-evaluate", "exec-register", "exec-promote", "exec-train-in-pod"):
        secrets = executors[name]["secretAsEnv"]
        mlflow = next(s for s in secrets if s["keyToEnv"][0]["envVar"] == "MLFLOW_TRACKING_USERNAME")
        assert mlflow["secretNameParameter"]["componentInputParameter"].endswith("mlflow_secret"), name
        assert executors[name]["podMetadata"]["labels"]["tim-pipeline/mlflow-client"] == "true"
    s3 = executors["exec-fingerprint"]["secretAsEnv"][0]
    assert {e["envVar"] for e in s3["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert s3["secretNameParameter"]["componentInputParameter"] == "s3_secret"
    token = executors["exec-train-ray-jobs"]["secretAsEnv"][-1]
    assert token["keyToEnv"] == [{"envVar": "RAY_AUTH_TOKEN", "secretKey": "token"}]
    for executor in spec["deploymentSpec"]["executors"].values():  # no credential is a literal value anywhere
        names = {e["name"] for e in executor["container"].get("env", [])}
        assert not names & {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"}


def test_caching_is_on_for_the_data_tasks_only_and_gpus_are_task_settings(committed):
    spec, executors = committed
    tasks = tasks_of(spec)
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"prepare", "validate", "shard", "encode"}
    for name in ("prepare", "validate", "shard", "encode"):
        assert "cache_key" in tasks[name]["inputs"]["parameters"]     # the fingerprint task's key for it
    train = tasks["train-in-pod"]
    resources = spec["deploymentSpec"]["executors"]["exec-train-in-pod"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "gpus_per_worker" in resources["accelerator"]["resourceCount"] and "gpus_per_worker" in json.dumps(train)
    k8s = executors["exec-train-in-pod"]
    assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("node_selector")
    assert k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith("tolerations")


def test_compile_cli_needs_an_image_and_writes_where_asked(tmp_path):
    project = project_copy(tmp_path / "p")
    res = tim("pipeline", "compile", cwd=project, timeout=120)
    assert res.returncode == 2 and "--image" in res.stderr
    res = tim("pipeline", "compile", "--image", "", "--out", "x.yaml", cwd=project, timeout=120)
    assert res.returncode == 2 and "error: --image: the project's image" in res.stderr
    res = tim("pipeline", "compile", "--image", "reg.example.com/tim:1.0", "--out", "out/x.yaml", cwd=project,
              timeout=120)
    assert res.returncode == 0, res.stderr
    assert images_of(read_package(project / "out" / "x.yaml")) == {"reg.example.com/tim:1.0"}


def test_kuberay_rayjob_of_a_run_renders_and_matches_the_infra_schema(tmp_path, monkeypatch):
    from pipelines.rayjob import schema_errors
    from pipelines.tasks import kuberay_job

    project = project_copy(tmp_path / "p")
    monkeypatch.setenv("TIM_PARAMS", str(project / "params.yaml"))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text('{"splits": {}}')
    sets = ["train.distributed.storage_path=s3://tim-runs/train", "mlflow.tracking_uri=http://mlflow:5000",
            "train.distributed.use_gpu=true", "train.distributed.num_workers=8"]
    job, uri, identity = kuberay_job(
        "gpu", sets, str(shards), ray_workers=2, gpus_per_worker=4, worker_memory="256Gi",
        node_selector={"pool": "a100"}, tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        mlflow_secret="mlflow-client", s3_secret="tim-s3", namespace="tim", image="reg.example.com/tim:0.1.0-gpu")
    spec = job["spec"]
    assert schema_errors({**job, "spec": {k: v for k, v in spec.items() if k != "runtimeEnvYAML"}}) == []
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": uri}
    assert uri == f"s3://tim-runs/train/jobs/{job['metadata']['name']}.zip" and identity in job["metadata"]["name"]
    assert spec["entrypoint"].startswith("tim train --params params.yaml --profile gpu --set ")
    assert "--set mlflow.tracking_uri=http://mlflow:5000 --shards shards --out model" in spec["entrypoint"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2 and group["template"]["spec"]["nodeSelector"] == {"pool": "a100"}
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4 and worker["image"] == "reg.example.com/tim:0.1.0-gpu"
    assert group["template"]["spec"]["tolerations"][0]["key"] == "gpu"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in worker["env"] if "valueFrom" in e}
    assert secrets == {"mlflow-client", "tim-s3"}
    with pytest.raises(Exception, match="storage_path is 'runs/train'"):
        kuberay_job("cpu-tiny", ["mlflow.tracking_uri=http://mlflow:5000"], str(shards), ray_workers=1,
                    gpus_per_worker=0, worker_memory="4Gi", node_selector={}, tolerations=[],
                    mlflow_secret="mlflow-client", s3_secret="tim-s3", namespace="tim", image="reg/tim:1")
