"""`tim pipeline submit | schedule | unschedule`: the compiled pipeline on a Kubeflow Pipelines backend.

Auth is KFP's usual: ``--host`` (or ``KF_PIPELINES_ENDPOINT``) with a bearer token from ``KF_PIPELINES_TOKEN`` when
set, else the kube config / in-cluster service account that ``kfp.Client`` finds. Submitting uploads the YAML
(a new version of the pipeline when one of that name exists) and starts a run of that version in an experiment;
scheduling uploads it the same way, then creates a recurring run on the pipeline itself, which the backend
resolves to its latest version at every trigger (so a later upload changes what the schedule runs), with at
most one run at a time and no catch-up of missed triggers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.common.errors import Unreachable, UserError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
HEALTHZ = "/apis/v2beta1/healthz"
PROBE_TIMEOUT_S = 10.0


def read_package(path: Path) -> dict[str, Any]:
    """The pipeline spec (first YAML document) of a compiled package."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no compiled pipeline there; run `tim pipeline compile --image ...` first")
    return next(yaml.safe_load_all(Path(path).read_text()))


def form_of(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The run form of a pipeline spec: parameter name -> {parameterType, defaultValue, description}."""
    return dict(spec["root"]["inputDefinitions"]["parameters"])


def images_of(spec: Mapping[str, Any]) -> set[str]:
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6:
        raise UserError(f"--cron {cron!r}: KFP's cron has 6 fields, seconds first: 'SEC MIN HOUR DOM MON DOW', "
                        "e.g. '0 0 3 * * 1' for Mondays at 03:00")
    return " ".join(fields)


@contextlib.contextmanager
def api_errors(host: str | None, what: str) -> Iterator[None]:
    """KFP client and transport errors as the project's: unreachable or 5xx -> 75, refused input/auth -> 2."""
    import kfp_server_api
    import urllib3

    where = host or "the KFP endpoint of the kube config"
    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status in (0, None) or exc.status >= 500:
            raise Unreachable(f"{what}: KFP at {where} answered HTTP {exc.status} {exc.reason}") from None
        hint = f" (set {TOKEN_ENV} or check the kube config)" if exc.status in (401, 403) else ""
        raise UserError(f"{what}: KFP at {where} refused it: HTTP {exc.status} {exc.reason}{hint}: "
                        f"{(exc.body or '')[:300]}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unreachable(f"{what}: KFP at {where} is unreachable: {exc}") from None


def connect(host: str | None, namespace: str | None):
    """A kfp.Client, after checking that the host answers at all (75 when it does not)."""
    import kfp
    import requests

    if host:
        try:
            response = requests.get(host.rstrip("/") + HEALTHZ, timeout=PROBE_TIMEOUT_S,
                                    headers=_auth_header())
        except requests.RequestException as exc:
            raise Unreachable(f"KFP at {host} is unreachable ({type(exc).__name__}); check --host / "
                              "KF_PIPELINES_ENDPOINT and the port-forward") from None
        if response.status_code >= 500:
            raise Unreachable(f"KFP at {host}: {HEALTHZ} answered HTTP {response.status_code}")
    with api_errors(host, "connect"):
        return kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None,
                          namespace=namespace or "kubeflow")


def _auth_header() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    new_pipeline: bool


def upload(client, package: Path, name: str, host: str | None) -> Uploaded:
    """The package as pipeline ``name``: created with its first version, or a new version of it."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:8]
    version = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{digest}"
    with api_errors(host, f"upload pipeline {name}"):
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            created = client.upload_pipeline(str(package), pipeline_name=name)
            listed = client.list_pipeline_versions(created.pipeline_id, sort_by="created_at desc", page_size=1)
            first = listed.pipeline_versions[0]
            return Uploaded(created.pipeline_id, first.pipeline_version_id, first.display_name, True)
        made = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
        return Uploaded(pipeline_id, made.pipeline_version_id, version, False)


def experiment_id(client, name: str, namespace: str | None, host: str | None) -> str:
    with api_errors(host, f"experiment {name}"):
        return client.create_experiment(name, namespace=namespace).experiment_id


def submit(*, host: str | None, namespace: str | None, package: Path, pipeline_name: str, experiment: str,
           run_name: str | None, args: Mapping[str, Any], service_account: str) -> dict[str, str]:
    client = connect(host, namespace)
    uploaded = upload(client, package, pipeline_name, host)
    exp = experiment_id(client, experiment, namespace, host)
    name = run_name or f"{pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with api_errors(host, "start run"):
        run = client.run_pipeline(experiment_id=exp, job_name=name, params=dict(args),
                                  pipeline_id=uploaded.pipeline_id, version_id=uploaded.version_id,
                                  service_account=service_account)
    return {"run_id": run.run_id, "pipeline_id": uploaded.pipeline_id, "version_id": uploaded.version_id,
            "version": uploaded.version_name, "experiment_id": exp, "run_name": name}


def _recurring_runs(client, exp: str, name: str) -> list:
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=exp, page_token=token, page_size=100)
        found += [r for r in (page.recurring_runs or []) if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def schedule(*, host: str | None, namespace: str | None, package: Path, pipeline_name: str, experiment: str,
             job_name: str, cron: str, args: Mapping[str, Any], service_account: str) -> dict[str, Any]:
    """A recurring run of the pipeline's latest version (replacing one of the same name)."""
    import kfp_server_api as api

    cron = check_cron(cron)
    client = connect(host, namespace)
    uploaded = upload(client, package, pipeline_name, host)
    exp = experiment_id(client, experiment, namespace, host)
    with api_errors(host, f"schedule {job_name}"):
        replaced = [r.recurring_run_id for r in _recurring_runs(client, exp, job_name)]
        for rid in replaced:
            client.delete_recurring_run(rid)
        # kfp.Client.create_recurring_run wants a version id; a pipeline id alone is what makes the backend take
        # the latest version at each trigger, so the request is built here.
        body = api.V2beta1RecurringRun(
            experiment_id=exp, display_name=job_name, description=f"Scheduled retraining ({cron})",
            mode=api.RecurringRunMode.ENABLE,
            pipeline_version_reference=api.V2beta1PipelineVersionReference(pipeline_id=uploaded.pipeline_id),
            runtime_config=api.V2beta1RuntimeConfig(parameters=dict(args)),
            trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron)),
            max_concurrency=1, no_catchup=True, service_account=service_account)
        made = client._recurring_run_api.recurring_run_service_create_recurring_run(recurring_run=body)
    return {"recurring_run_id": made.recurring_run_id, "pipeline_id": uploaded.pipeline_id, "cron": cron,
            "replaced": replaced, "experiment_id": exp}


def unschedule(*, host: str | None, namespace: str | None, experiment: str, job_name: str) -> list[str]:
    """Delete the recurring runs named ``job_name`` in the experiment; their ids (none: nothing to do)."""
    client = connect(host, namespace)
    with api_errors(host, f"unschedule {job_name}"):
        try:
            found = client.get_experiment(experiment_name=experiment, namespace=namespace)
        except ValueError:
            raise UserError(f"no experiment {experiment!r} at {host or 'the KFP endpoint'}: nothing is scheduled "
                            "there") from None
        ids = [r.recurring_run_id for r in _recurring_runs(client, found.experiment_id, job_name)]
        for rid in ids:
            client.delete_recurring_run(rid)
    return ids
