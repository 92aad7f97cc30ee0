"""The kustomize overlays: they render offline, every object validates strictly against the Kubernetes 1.32
schemas, and the rendered manifests keep the project's rules (limits, non-root, no privilege, pinned images,
least-privilege RBAC, network policies, no credentials, MLflow's server flags)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.manifests import (
    K8S, K8S_VERSION, OVERLAYS, containers, dump_all, pod_specs, rayjob_pods, render_overlay, run, tool,
)

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration"}


def kubernetes_validate(objects: list[dict[str, Any]], tmp_path: Path, name: str) -> tuple[int, str]:
    """kubernetes-validate --strict against 1.32 (bundled schemas, no network): exit code and output."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_all(objects))
    result = run([tool("kubernetes-validate"), "-k", K8S_VERSION, "--strict", str(path)])
    return result.returncode, result.stdout + result.stderr


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def strip_hash(name: str) -> str:
    return re.sub(r"-[a-z0-9]{10}$", "", name)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_offline(overlay, rendered):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "Job", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
            "ConfigMap"} <= kinds
    assert "mlflow" in by_kind(objects, "Deployment")
    assert "mlflow-db-upgrade" in by_kind(objects, "Job")
    assert "kfp-launcher" in by_kind(objects, "ConfigMap")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_validates_strictly_against_kubernetes_1_32(overlay, rendered, tmp_path):
    objects = rendered[overlay]
    code, out = kubernetes_validate(objects, tmp_path, overlay)
    assert code == 0, out
    passed = [line for line in out.splitlines() if " passed for resource " in line]
    assert len(passed) == len(objects), f"not every object was validated (built-in kinds only):\n{out}"


def test_kubernetes_validate_rejects_a_misspelled_field(rendered, tmp_path):
    broken = yaml.safe_load(dump_all([by_kind(rendered["dev"], "Deployment")["mlflow"]]))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    code, out = kubernetes_validate([broken], tmp_path, "broken")
    assert code != 0 and "'resource' was unexpected" in out, out


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_namespaced_only_and_in_the_overlay_namespace(overlay, rendered):
    for obj in rendered[overlay]:
        assert obj["kind"] not in CLUSTER_SCOPED, f"{obj['kind']}/{obj['metadata']['name']}: nothing cluster-wide"
        assert obj["metadata"].get("namespace") == OVERLAYS[overlay], obj["metadata"]


def check_pod_rules(where: str, spec: dict[str, Any]) -> list[str]:
    """The rules every pod of the project keeps; returns what is broken."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: no RuntimeDefault seccomp profile")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken is not false")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append(f"{where}: uses a host namespace")
    writable = {m["mountPath"] for c in containers(spec) for m in c.get("volumeMounts", [])}
    for c in containers(spec):
        name = f"{where} container {c['name']}"
        res = c.get("resources", {})
        for side in ("requests", "limits"):
            for key in ("cpu", "memory"):
                if key not in res.get(side, {}):
                    problems.append(f"{name}: no {side}.{key}")
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities are not dropped (drop: [ALL])")
        if sc.get("capabilities", {}).get("add"):
            problems.append(f"{name}: adds capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root file system is not read-only")
        if sc.get("runAsUser") == 0 or pod_sc.get("runAsUser") == 0:
            problems.append(f"{name}: runs as UID 0")
        image = c.get("image", "")
        tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
        for env in c.get("env", []):
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|(STORE|DB)_URI$", env["name"]) and "value" in env:
                problems.append(f"{name}: {env['name']} has a literal value; it must come from a Secret")
    if "/tmp" not in writable:
        problems.append(f"{where}: no writable /tmp (emptyDir) for a read-only root file system")
    return problems


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_pod_keeps_the_security_and_resource_rules(overlay, rendered):
    problems = [p for where, spec in pod_specs(rendered[overlay]) for p in check_pod_rules(where, spec)]
    assert not problems, "\n".join(problems)


def test_the_rules_catch_a_container_without_limits_and_a_privileged_one(rendered):
    deployment = yaml.safe_load(dump_all([by_kind(rendered["prod"], "Deployment")["mlflow"]]))
    spec = deployment["spec"]["template"]["spec"]
    del spec["containers"][0]["resources"]["limits"]
    spec["containers"][0]["securityContext"]["privileged"] = True
    problems = check_pod_rules("Deployment/mlflow", spec)
    assert "Deployment/mlflow container mlflow: no limits.cpu" in problems
    assert "Deployment/mlflow container mlflow: privileged" in problems


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_no_credentials_in_the_manifests(overlay, rendered):
    assert not by_kind(rendered[overlay], "Secret"), "Secrets are created by hand (docs/deploy.md), not committed"
    referenced = {ref["secretKeyRef"]["name"] for _, spec in pod_specs(rendered[overlay]) for c in containers(spec)
                  for env in c.get("env", []) for ref in [env.get("valueFrom", {})] if "secretKeyRef" in ref}
    expected = {"mlflow-db", "mlflow-auth", "tim-s3"} | ({"tim-postgres"} if overlay == "dev" else set())
    assert referenced == expected


def test_rbac_is_least_privilege(rendered):
    for overlay, objects in rendered.items():
        roles = by_kind(objects, "Role")
        assert set(roles) == {"tim-rayjob-runner", "tim-kfp-task"}
        assert roles["tim-rayjob-runner"]["rules"] == [
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"],
             "verbs": ["create", "get", "list", "watch", "delete"]}]
        for role in roles.values():
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
                if "secrets" in rule["resources"] or "configmaps" in rule["resources"]:
                    assert rule["verbs"] == ["get"] and rule.get("resourceNames"), rule
        for binding in by_kind(objects, "RoleBinding").values():
            assert binding["roleRef"]["kind"] == "Role"
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tim-pipeline",
                                            "namespace": OVERLAYS[overlay]}]
        accounts = by_kind(objects, "ServiceAccount")
        assert accounts["tim-pipeline"]["automountServiceAccountToken"] is True
        assert all(sa["automountServiceAccountToken"] is False for name, sa in accounts.items()
                   if name != "tim-pipeline")


def ingress_sources(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [src for rule in policy["spec"].get("ingress", []) for src in rule.get("from", [])]


def test_network_policies_guard_mlflow_and_the_database(rendered):
    for overlay, objects in rendered.items():
        policies = by_kind(objects, "NetworkPolicy")
        mlflow = policies["mlflow"]
        assert mlflow["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
        assert ingress_sources(mlflow) == [{"podSelector": {"matchLabels": {"tim-pipeline/mlflow-client": "true"}}}]
        assert policies["no-ingress"]["spec"].get("ingress") is None
    dev = by_kind(rendered["dev"], "NetworkPolicy")
    db_only = [{"podSelector": {"matchLabels": {"tim-pipeline/db-client": "true"}}}]
    assert ingress_sources(dev["tim-postgres"]) == db_only
    # Who carries the labels: the database only from the MLflow server and its upgrade Job.
    db_clients = {f"{o['kind']}/{o['metadata']['name']}" for o in rendered["dev"]
                  if o["kind"] in ("Deployment", "StatefulSet", "Job")
                  and o["spec"]["template"]["metadata"].get("labels", {}).get("tim-pipeline/db-client") == "true"}
    assert db_clients == {"Deployment/mlflow", "Job/mlflow-db-upgrade"}


def test_ray_pods_are_mlflow_clients_and_covered_by_a_policy(template_job, rendered):
    pods = rayjob_pods(template_job)
    selectors = [p["spec"]["podSelector"]["matchLabels"] for p in by_kind(rendered["prod"], "NetworkPolicy").values()]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in selectors), f"{pod['metadata']['name']}: no policy"
    head, worker = pods[0], pods[1]
    assert head["metadata"]["labels"]["tim-pipeline/mlflow-client"] == "true"
    assert worker["metadata"]["labels"]["tim-pipeline/mlflow-client"] == "true"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_mlflow_server(overlay, rendered):
    objects = rendered[overlay]
    deployment = by_kind(objects, "Deployment")["mlflow"]
    spec = deployment["spec"]["template"]["spec"]
    server = spec["containers"][0]
    script = " ".join(server["command"] + server["args"])
    for flag in ("mlflow server", "--serve-artifacts", '--artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"',
                 '--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"', "--app-name basic-auth", "--host 0.0.0.0"):
        assert flag in script, flag
    assert "--backend-store-uri" not in script, "the store URI (with its password) comes from the environment"
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db",
                                                                           "key": "backend-store-uri"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/tmp/")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] == "/health", probe
    assert spec["initContainers"][0]["name"] == "wait-for-schema"

    config = next(o for o in objects
                  if o["kind"] == "ConfigMap" and strip_hash(o["metadata"]["name"]) == "mlflow-server")
    assert server["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    hosts = config["data"]["MLFLOW_ALLOWED_HOSTS"].split(",")
    ns = OVERLAYS[overlay]
    for host in ("mlflow", "mlflow:*", f"mlflow.{ns}.svc", f"mlflow.{ns}.svc.cluster.local:*", "localhost:*"):
        assert host in hosts, host
    assert "*" not in hosts

    service = by_kind(objects, "Service")["mlflow"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http"}]

    upgrade = by_kind(objects, "Job")["mlflow-db-upgrade"]
    job_container = upgrade["spec"]["template"]["spec"]["containers"][0]
    assert "mlflow db upgrade" in " ".join(job_container["command"])
    assert upgrade["spec"]["backoffLimit"] <= 10 and upgrade["spec"]["ttlSecondsAfterFinished"] > 0


def test_kfp_pipeline_root_is_on_s3(rendered):
    for overlay, objects in rendered.items():
        launcher = by_kind(objects, "ConfigMap")["kfp-launcher"]
        assert launcher["data"]["defaultPipelineRoot"].startswith("s3://"), overlay
        providers = yaml.safe_load(launcher["data"]["providers"])
        ref = providers["s3"]["default"]["credentials"]["secretRef"]
        assert ref["secretName"] == "tim-s3"


def test_dev_runs_its_stores_in_the_cluster_and_prod_does_not(rendered):
    def images(objects):
        return {c["image"] for _, spec in pod_specs(objects) for c in containers(spec)}

    dev, prod = images(rendered["dev"]), images(rendered["prod"])
    assert {"docker.io/library/postgres:17.6", "docker.io/minio/minio:RELEASE.2025-09-07T16-13-09Z",
            "tim-pipeline:0.1.0-cpu"} == dev
    assert prod == {"registry.example.com/tim-pipeline:0.1.0-cpu"}
    assert by_kind(rendered["prod"], "Deployment")["mlflow"]["spec"]["replicas"] == 2
    assert "tim-postgres" not in by_kind(rendered["prod"], "StatefulSet")


def test_base_alone_renders(tmp_path):
    assert render_overlay(K8S / "base")
