"""The training RayJob for a pipeline run, rendered from parameters (no Kubernetes client, no I/O but reading
the template).

The template and its JSON schema live in ``infra/k8s/rayjob/`` (``rayjob.yaml``, ``rayjob.schema.json``). They
are found, in this order, at:

1. ``template_dir=`` given to :func:`render_rayjob`;
2. ``$TIM_RAYJOB_DIR`` (the project image sets it to ``/opt/tim/infra/k8s/rayjob``, where it copies them);
3. ``<repository>/infra/k8s/rayjob`` next to this package (a checkout or an editable install);
4. ``pipelines/rayjob/`` inside the installed package (importlib.resources), for a build that ships them as
   package data.

A wheel built from ``pyproject.toml`` as it is today does not carry the YAML files, so outside a checkout or the
image, set ``TIM_RAYJOB_DIR`` or pass ``template_dir``.

    from pipelines.rayjob import render_rayjob, train_entrypoint

    job = render_rayjob(
        name="tim-train-20260101", namespace="tim", image="registry.example.com/tim-pipeline:0.1.0-gpu",
        entrypoint=train_entrypoint(workers=2, gpus_per_worker=4, cpus_per_worker=32),
        workers=2, gpus_per_worker=4, cpus_per_worker=32, memory_per_worker="256Gi",
        mlflow_tracking_uri="http://mlflow:5000", mlflow_secret="mlflow-client", s3_secret="tim-s3")
    # kubernetes.client.CustomObjectsApi().create_namespaced_custom_object("ray.io", "v1", "tim", "rayjobs", job)
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_NAME = "rayjob.yaml"
SCHEMA_NAME = "rayjob.schema.json"
ENV_DIR = "TIM_RAYJOB_DIR"

# KubeRay appends 6 characters to a RayJob's name for its RayCluster, whose name may be 53 long.
MAX_NAME_LENGTH = 47
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_GPU = "nvidia.com/gpu"
# Env vars whose Secret is chosen by render_rayjob's mlflow_secret / s3_secret.
_MLFLOW_SECRET_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
_S3_SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}


class RayJobError(ValueError):
    """A parameter of the RayJob is wrong (names the parameter and what is allowed)."""


def find_template_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding rayjob.yaml and rayjob.schema.json (see the module docstring for the order)."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]))
    else:
        candidates.append(Path(__file__).resolve().parent.parent / "infra" / "k8s" / "rayjob")
        try:
            packaged = resources.files("pipelines") / "rayjob"
            if packaged.is_dir():
                candidates.append(Path(str(packaged)))
        except (ModuleNotFoundError, TypeError):  # pragma: no cover - not an importable package
            pass
    for folder in candidates:
        if (folder / TEMPLATE_NAME).is_file() and (folder / SCHEMA_NAME).is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no {TEMPLATE_NAME} + {SCHEMA_NAME} found (tried {tried}); set ${ENV_DIR} to the "
                            "folder that holds them (infra/k8s/rayjob in the repository)")


def load_template(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The template as plain data; a JSON round trip so that YAML anchors do not leave shared lists behind."""
    with open(find_template_dir(folder) / TEMPLATE_NAME, encoding="utf-8") as fh:
        return json.loads(json.dumps(yaml.safe_load(fh)))


def load_schema(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    with open(find_template_dir(folder) / SCHEMA_NAME, encoding="utf-8") as fh:
        return json.load(fh)


def schema_errors(job: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every violation of rayjob.schema.json, as ``<json path>: <message>`` (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema if schema is not None else load_schema())
    errors = sorted(validator.iter_errors(job), key=lambda e: e.json_path)
    return [f"{err.json_path}: {err.message}" for err in errors]


def train_entrypoint(workers: int, gpus_per_worker: int, cpus_per_worker: int, *, profile: str = "gpu",
                     params: str = "/opt/tim/params.yaml", sets: Sequence[str] = (),
                     args: Sequence[str] = ()) -> list[str]:
    """``tim train`` for a cluster of ``workers`` pods: one Ray Train worker per GPU (or per pod on CPU).

    ``sets`` are more ``section.key=value`` overrides (e.g. ``train.distributed.storage_path=s3://...``), ``args``
    more options of ``tim train`` (``--shards``, ``--out``, ``--run-file``). ``train.optim.global_batch`` must
    divide by the number of Ray Train workers (``tim train`` checks it before starting).
    """
    _positive("workers", workers)
    if not isinstance(gpus_per_worker, int) or gpus_per_worker < 0:
        raise RayJobError(f"gpus_per_worker must be an integer >= 0; got {gpus_per_worker!r}")
    _positive("cpus_per_worker", cpus_per_worker)
    train_workers = workers * max(gpus_per_worker, 1)
    cpus_each = max(1, cpus_per_worker // max(gpus_per_worker, 1))
    cmd = ["tim", "train", "--params", params, "--profile", profile,
           "--set", f"train.distributed.num_workers={train_workers}",
           "--set", f"train.distributed.cpus_per_worker={cpus_each}",
           "--set", f"train.distributed.use_gpu={'true' if gpus_per_worker else 'false'}"]
    for assignment in sets:
        cmd += ["--set", assignment]
    return cmd + list(args)


def render_rayjob(
    *,
    name: str,
    namespace: str,
    image: str,
    entrypoint: Sequence[str],
    workers: int,
    gpus_per_worker: int,
    cpus_per_worker: int | str,
    memory_per_worker: str,
    mlflow_tracking_uri: str,
    mlflow_secret: str,
    s3_secret: str,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    shm_size: str | None = None,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    service_account: str | None = None,
    active_deadline_seconds: int | None = None,
    ttl_seconds_after_finished: int | None = None,
    submitter_backoff_limit: int | None = None,
    template_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The RayJob for one training run, as a dict ready for the Kubernetes API (checked against the schema).

    ``workers`` worker pods, each with ``gpus_per_worker`` GPUs (0: a CPU worker group, and the template's GPU
    node selector and toleration are dropped unless given), ``cpus_per_worker`` CPUs and ``memory_per_worker``
    (a Kubernetes quantity, e.g. ``"64Gi"``); requests equal limits. ``node_selector`` / ``tolerations`` replace
    the template's (GPU nodes); ``None`` keeps them. ``entrypoint`` is the command as a list (see
    :func:`train_entrypoint`), quoted with shlex. ``mlflow_secret`` holds ``username`` / ``password`` for the
    MLflow server, ``s3_secret`` ``access-key-id`` / ``secret-access-key`` (optional ``endpoint-url``,
    ``region``). ``env`` adds or replaces plain env vars on the head and workers (e.g. NCCL settings).
    ``shm_size`` is the workers' /dev/shm (memory-backed, counted in their memory). ``None`` for the other
    options keeps the template's value.
    """
    folder = find_template_dir(template_dir)
    job = load_template(folder)

    _dns_label("name", name, MAX_NAME_LENGTH)
    _dns_label("namespace", namespace, 63)
    _image(image)
    if isinstance(entrypoint, str) or not entrypoint or not all(isinstance(a, str) and a for a in entrypoint):
        raise RayJobError(f"entrypoint must be a non-empty list of non-empty strings; got {entrypoint!r}")
    _positive("workers", workers)
    if not isinstance(gpus_per_worker, int) or isinstance(gpus_per_worker, bool) or gpus_per_worker < 0:
        raise RayJobError(f"gpus_per_worker must be an integer >= 0; got {gpus_per_worker!r}")
    cpus = _quantity("cpus_per_worker", cpus_per_worker)
    memory = _quantity("memory_per_worker", memory_per_worker)
    if not isinstance(mlflow_tracking_uri, str) or not mlflow_tracking_uri.startswith(("http://", "https://")):
        raise RayJobError(f"mlflow_tracking_uri must be the server's http(s) URL; got {mlflow_tracking_uri!r}")
    _dns_label("mlflow_secret", mlflow_secret, 253)
    _dns_label("s3_secret", s3_secret, 253)

    meta = job["metadata"]
    meta["name"], meta["namespace"] = name, namespace
    meta.setdefault("labels", {}).update(dict(labels or {}))
    spec = job["spec"]
    spec["entrypoint"] = shlex.join(entrypoint)
    if active_deadline_seconds is not None:
        _positive("active_deadline_seconds", active_deadline_seconds)
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    if ttl_seconds_after_finished is not None:
        if not isinstance(ttl_seconds_after_finished, int) or ttl_seconds_after_finished < 0:
            raise RayJobError("ttl_seconds_after_finished must be an integer >= 0; "
                              f"got {ttl_seconds_after_finished!r}")
        spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    if submitter_backoff_limit is not None:
        if not isinstance(submitter_backoff_limit, int) or not 0 <= submitter_backoff_limit <= 5:
            raise RayJobError("submitter_backoff_limit must be an integer from 0 to 5; "
                              f"got {submitter_backoff_limit!r}")
        spec["submitterConfig"]["backoffLimit"] = submitter_backoff_limit

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    group = cluster["workerGroupSpecs"][0]
    worker = group["template"]
    submitter = spec["submitterPodTemplate"]
    for pod in (head, worker, submitter):
        pod["spec"]["containers"][0]["image"] = image
        if service_account is not None:
            _dns_label("service_account", service_account, 253)
            pod["spec"]["serviceAccountName"] = service_account
    for pod in (head, worker):
        container = pod["spec"]["containers"][0]
        container["env"] = _env(container["env"], mlflow_tracking_uri, mlflow_secret, s3_secret, env or {})
        if shm_size is not None and pod is worker:
            _volume(pod, "dshm")["emptyDir"]["sizeLimit"] = _quantity("shm_size", shm_size)

    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = workers
    group["groupName"] = "gpu" if gpus_per_worker else "cpu"
    resources_ = worker["spec"]["containers"][0]["resources"]
    for side in ("requests", "limits"):
        resources_[side]["cpu"], resources_[side]["memory"] = cpus, memory
        if gpus_per_worker:
            resources_[side][_GPU] = gpus_per_worker
        else:
            resources_[side].pop(_GPU, None)
    pod_spec = worker["spec"]
    if node_selector is not None:
        pod_spec["nodeSelector"] = {str(k): str(v) for k, v in node_selector.items()}
    elif not gpus_per_worker:
        pod_spec.pop("nodeSelector", None)
    if tolerations is not None:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    elif not gpus_per_worker:
        pod_spec.pop("tolerations", None)
    for key in ("nodeSelector", "tolerations"):
        if key in pod_spec and not pod_spec[key]:
            del pod_spec[key]

    errors = schema_errors(job, load_schema(folder))
    if errors:
        raise RayJobError("the rendered RayJob does not match rayjob.schema.json:\n  " + "\n  ".join(errors))
    return job


def _env(current: list[dict[str, Any]], uri: str, mlflow_secret: str, s3_secret: str,
         extra: Mapping[str, str]) -> list[dict[str, Any]]:
    out = []
    for var in current:
        var = dict(var)
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and var["name"] in _MLFLOW_SECRET_ENV:
            ref["name"] = mlflow_secret
        elif ref is not None and var["name"] in _S3_SECRET_ENV:
            ref["name"] = s3_secret
        if var["name"] == "MLFLOW_TRACKING_URI":
            var["value"] = uri
        out.append(var)
    for key, value in extra.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise RayJobError(f"env: {key!r} is not an environment variable name")
        if key in _MLFLOW_SECRET_ENV | _S3_SECRET_ENV | {"MLFLOW_TRACKING_URI"}:
            raise RayJobError(f"env: {key} is set from mlflow_tracking_uri / mlflow_secret / s3_secret")
        out = [v for v in out if v["name"] != key] + [{"name": key, "value": str(value)}]
    return out


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def _dns_label(what: str, value: Any, max_length: int) -> None:
    if not isinstance(value, str) or not _DNS_LABEL.match(value) or len(value) > max_length:
        raise RayJobError(f"{what} must be a lower-case DNS label (a-z, 0-9, '-') of at most {max_length} "
                          f"characters; got {value!r}")


def _image(image: Any) -> None:
    if not isinstance(image, str) or any(c.isspace() for c in image):
        raise RayJobError(f"image must be a string without spaces; got {image!r}")
    name = image.split("@", 1)[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
    if not tag or tag == "latest":
        raise RayJobError(f"image must carry an explicit tag other than latest (e.g. tim-pipeline:0.1.0-gpu); "
                          f"got {image!r}")


def _positive(what: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RayJobError(f"{what} must be an integer >= 1; got {value!r}")


def _quantity(what: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _QUANTITY.match(str(value)):
        raise RayJobError(f"{what} must be a Kubernetes quantity such as 8, 500m or 64Gi; got {value!r}")
    if float(re.match(r"[0-9.]+", str(value)).group()) <= 0:
        raise RayJobError(f"{what} must be more than zero; got {value!r}")
    return str(value)
