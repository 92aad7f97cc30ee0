"""Training mode ``kuberay``: `tim train` as a KubeRay ``RayJob`` made for this run from the infra template
(pipelines/rayjob.py, infra/k8s/rayjob/), created through the Kubernetes API and followed to its end.

The RayJob's pods cannot read the task's files: the task zips the shards with params.yaml, uploads the zip
under ``train.distributed.storage_path`` (an ``s3://`` prefix the cluster can read, as its checkpoints need
anyway) and names it as the job's Ray ``working_dir``, which Ray unpacks on the head and on every worker before
`tim train` starts there. The task stops following and deletes the RayJob (KubeRay then deletes its Ray cluster)
when it is cancelled. When the job succeeded, the model and run file come back through MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.common.errors import RetryableError, Unreachable, UserError
from pipelines.remote import working_dir

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
IMAGE_ENV = "TIM_IMAGE"  # the image the pipeline was compiled for: the RayJob's pods run it too
POLL_S = 10.0


@dataclass(frozen=True)
class Placement:
    """What the RayJob's workers get, from the run's parameters and the train section."""

    workers: int          # worker pods
    gpus_per_worker: int
    cpus_per_worker: int
    memory_per_worker: str
    node_selector: dict[str, str] | None
    tolerations: list[dict[str, Any]] | None


def placement(params, ray_workers: int, gpus_per_worker: int, memory: str, node_selector: dict,
              tolerations: list) -> Placement:
    """Pods: ``ray_workers`` (else one per Ray Train worker of params.yaml); each gets ``gpus_per_worker`` GPUs
    and the CPUs of as many Ray Train workers (train.distributed.cpus_per_worker each)."""
    d = params.distributed
    pods = ray_workers or (d.num_workers // max(gpus_per_worker, 1))
    return Placement(workers=max(pods, 1), gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=d.cpus_per_worker * max(gpus_per_worker, 1), memory_per_worker=memory,
                     node_selector=dict(node_selector) or None, tolerations=list(tolerations) or None)


def working_dir_uri(storage_path: str, name: str) -> str:
    if not storage_path.startswith("s3://"):
        raise UserError(f"train_mode kuberay: train.distributed.storage_path is {storage_path!r}; the RayJob's pods "
                        "need shared storage for the shards and checkpoints: set it to an s3:// prefix (the gpu "
                        "profile's is s3://tim-runs/train)")
    return f"{storage_path.rstrip('/')}/jobs/{name}.zip"


def upload_working_dir(uri: str, shards: Path, params: Path, scratch: Path) -> None:
    """Zip ``shards/`` and ``params.yaml`` and put the zip at ``uri`` (credentials: the task's AWS_* env)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    folder = working_dir(scratch / "job", shards, params)
    archive = shutil.make_archive(str(scratch / "job"), "zip", root_dir=folder)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        boto3.client("s3").upload_file(archive, bucket, key)
    except (BotoCoreError, ClientError) as exc:
        raise Unreachable(f"cannot upload the RayJob's working folder to {uri}: {exc}") from None


def rayjob(*, name: str, namespace: str, image: str, entrypoint: list[str], where: Placement, working_dir: str,
           tracking_uri: str, mlflow_secret: str, s3_secret: str) -> dict[str, Any]:
    """The RayJob for this run: rendered from the infra template (render_rayjob checks it against
    rayjob.schema.json), plus the job's Ray ``working_dir``, a KubeRay v1 field (``spec.runtimeEnvYAML``) that the
    infra schema does not list yet, so it is added after the check."""
    from pipelines.rayjob import RayJobError, render_rayjob

    try:
        job = render_rayjob(
            name=name, namespace=namespace, image=image, entrypoint=entrypoint, workers=where.workers,
            gpus_per_worker=where.gpus_per_worker, cpus_per_worker=where.cpus_per_worker,
            memory_per_worker=where.memory_per_worker, mlflow_tracking_uri=tracking_uri,
            mlflow_secret=mlflow_secret, s3_secret=s3_secret, node_selector=where.node_selector,
            tolerations=where.tolerations, labels={"tim-pipeline/run": name})
    except RayJobError as exc:
        raise UserError(f"the training RayJob: {exc}") from None
    job["spec"]["runtimeEnvYAML"] = yaml.safe_dump({"working_dir": working_dir}, sort_keys=False)
    return job


def job_name(identity: str) -> str:
    return f"tim-train-{identity[:12]}-{uuid.uuid4().hex[:6]}"


def namespace() -> str:
    """The task's own namespace (the RayJob goes beside it; the task's Role allows nothing else)."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if NAMESPACE_FILE.is_file():
        return NAMESPACE_FILE.read_text().strip()
    raise UserError("train_mode kuberay runs inside a Kubernetes pod (no service-account namespace here)")


def api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except config.ConfigException as exc:
            raise UserError(f"no Kubernetes API to create the RayJob with: {exc}") from None
    return client.CustomObjectsApi()


def outcome(status: dict[str, Any]) -> tuple[bool, str] | None:
    """(succeeded, summary) once the RayJob has ended, else None (KubeRay 1.x status fields)."""
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    if deployment not in ("Complete", "Failed") and job not in ("SUCCEEDED", "FAILED", "STOPPED"):
        return None
    summary = f"jobDeploymentStatus {deployment or '-'}, jobStatus {job or '-'}"
    if status.get("reason") or status.get("message"):
        summary += f": {status.get('reason', '')} {status.get('message', '')}".rstrip()
    return job == "SUCCEEDED" and deployment != "Failed", summary


def failure_code(status: dict[str, Any]) -> int:
    """The job's own code failed (2: fix and rerun) or the cluster did (75: deadline, submission, scheduling)."""
    return 2 if status.get("jobStatus") == "FAILED" and status.get("reason") in (None, "", "AppFailed") else 75


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Create the RayJob, print its status changes, return its final status; delete it when interrupted."""
    from kubernetes.client import ApiException

    objects = api()
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    except ApiException as exc:
        raise (UserError if 400 <= exc.status < 500 else Unreachable)(
            f"cannot create RayJob {ns}/{name}: HTTP {exc.status} {exc.reason}") from None
    print(f"created RayJob {ns}/{name}; following it (kubectl -n {ns} get rayjob {name} -w)", flush=True)
    last = None
    try:
        while True:
            try:
                status = objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status", {})
            except ApiException as exc:
                if exc.status == 404:
                    raise RetryableError(f"RayJob {ns}/{name} was deleted while the task waited for it") from None
                raise
            seen = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
            if seen != last:
                print(f"RayJob {name}: {json.dumps(status, sort_keys=True)}", flush=True)
                last = seen
            if outcome(status) is not None:
                return status
            time.sleep(POLL_S)
    except BaseException:
        try:
            objects.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                    propagation_policy="Foreground")
            print(f"deleted RayJob {ns}/{name} (and with it its Ray cluster)", flush=True)
        except Exception as exc:  # the API may be why we are leaving
            print(f"could not delete RayJob {ns}/{name}: {exc}", flush=True)
        raise
