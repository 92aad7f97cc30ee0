"""The body of each Kubeflow task (pipelines/pipeline.py's components are one call into here each): the `tim`
command of the stage, then what the KFP UI shows of its outputs. Runs inside the project's image (or, for
`tim pipeline run-local`, in this checkout's environment)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import present
from pipelines.inputs import DATA_STAGES, section_sets, validated_overrides
from pipelines.runtime import (
    CODE_TAG,
    DATA_CODE,
    ENCODE_CODE,
    TRAIN_CODE,
    TaskFailed,
    code_digest,
    key_of,
    params_args,
    project_params,
    scratch,
    source,
    task,
    tim,
    tracking,
)


# --- fingerprint: the run's inputs checked, the source's digest, the data tasks' cache keys -------------------
@task("fingerprint")
def fingerprint(form: Mapping[str, Any], out: str) -> dict[str, Any]:
    """Check every params section the run will read (the form's fields and ``params_set`` applied), then
    fingerprint the data source with `tim fingerprint`. Returns the task's output parameters."""
    profile = form["params_profile"]
    sets = validated_overrides(form, project_params())
    src = source(profile, sets)
    tim("fingerprint", *params_args(profile, section_sets(sets, "prepare")), "--out", out)
    digest = json.loads(Path(out).read_text())["digest"]
    from components.data.encode import EncodeParams, vae_fingerprint

    # The data tasks are cached on these: what they read besides their inputs (the source for prepare, the VAE's
    # files for encode), their resolved section and their code.
    outside = {"prepare": digest, "encode": vae_fingerprint(src.load("encode", EncodeParams))}
    outputs: dict[str, Any] = {"digest": digest, "sets": sets}
    for stage in DATA_STAGES:
        code = code_digest(ENCODE_CODE if stage == "encode" else DATA_CODE)
        outputs[f"{stage}_key"] = key_of(outside.get(stage), src.section(stage), code)
        outputs[f"{stage}_sets"] = section_sets(sets, stage)
    print(f"source digest {digest[:12]}; cache keys: "
          + ", ".join(f"{s} {outputs[f'{s}_key'][:12]}" for s in DATA_STAGES), flush=True)
    return outputs


# --- data -------------------------------------------------------------------------------------------------------
@task("prepare")
def prepare(profile: str, sets: Sequence[str], out: str) -> dict[str, Any]:
    tim("prepare", *params_args(profile, sets), "--out", out)
    meta = json.loads((Path(out) / "dataset.json").read_text())
    return {"source": str(meta["source"]), "classes": len(meta["classes"]), **meta["counts"]}


@task("validate")
def validate(profile: str, sets: Sequence[str], prepared: str, out: str, docs: str) -> None:
    tim("validate", *params_args(profile, sets), "--prepared", prepared, "--out", out)
    Path(docs).write_text(present.data_docs(Path(out)))


@task("shard")
def shard(profile: str, sets: Sequence[str], prepared: str, validated: str, out: str) -> dict[str, Any]:
    from components.data.reader import data_version, read_index

    tim("shard", *params_args(profile, sets), "--prepared", prepared, "--validated", validated, "--out", out)
    index = read_index(out)
    return {"data_version": data_version(out), "classes": index["num_classes"],
            **{split: entry["count"] for split, entry in index["splits"].items()}}


@task("encode")
def encode(profile: str, sets: Sequence[str], shards: str, out: str) -> dict[str, Any]:
    from components.data.reader import data_version, read_index, sample_shape

    tim("encode", *params_args(profile, sets), "--shards", shards, "--out", out)
    index = read_index(out)
    vae = (index.get("latent") or {}).get("vae") or {}
    return {"data_version": data_version(out), "space": index["encoding"]["space"],
            "shape": "x".join(map(str, sample_shape(index))), "vae": str(vae.get("name", "")),
            "vae_sha256": str(vae.get("sha256", ""))}


# --- plan: is there anything new to train? ----------------------------------------------------------------------
def _trained_versions(client, name: str, identity: str, code: str) -> list[str]:
    """Versions of ``name`` whose training run had this identity (params, data, warm start) and code."""
    from mlflow.exceptions import MlflowException

    from components.train.lineage import IDENTITY_TAG

    found = []
    for version in client.search_model_versions(f"name='{name}'"):
        try:
            tags = client.get_run(version.run_id).data.tags
        except MlflowException:
            continue  # the run was deleted: that version proves nothing
        if tags.get(IDENTITY_TAG) == identity and tags.get(CODE_TAG) == code:
            found.append(str(version.version))
    return sorted(found, key=int)


@task("plan")
def plan(profile: str, sets: Sequence[str], shards: str, force_train: bool, summary: str) -> bool:
    """True when this run must train: forced, or no registered version was trained with the same identity
    (train params, data version, warm start) and the same code. Writes the reason as Markdown."""
    from components.registry.client import RegistryParams
    from components.train.settings import TrainParams
    from components.train.stage import identity_of

    src = source(profile, sets)
    params = src.load("train", TrainParams)
    name = src.load("registry", RegistryParams).model_name
    identity, code = identity_of(params, shards), code_digest(TRAIN_CODE)
    from components.data.reader import data_version

    facts = (f"training identity `{identity}` (train params, data version `{data_version(shards)[:12]}`, warm start "
             f"{params.init_from or 'none'}), code `{code[:12]}`")
    store = tracking(profile, sets)
    same = _trained_versions(store.client(), name, identity, code)
    if force_train:
        decision, reason = True, "force_train is set"
    elif same:
        decision = False
        reason = (f"no training: {name} version {', '.join(same)} was trained on the same data with the same "
                  "params and code, and was judged by the gate then; set force_train to train anyway")
    else:
        decision, reason = True, f"no version of {name} was trained with this identity and code"
    text = f"# {'Training' if decision else 'Nothing to train'}\n\n{reason}.\n\n{facts}.\n"
    Path(summary).write_text(text)
    print(text, flush=True)
    return decision


# --- training, three ways ---------------------------------------------------------------------------------------
def _mark(profile: str, sets: Sequence[str], run_file: str) -> dict[str, Any]:
    """Tag the run with the code it trained with (the plan task compares it) and return the model's metadata."""
    run = json.loads(Path(run_file).read_text())
    tracking(profile, sets).client().set_tag(run["run_id"], CODE_TAG, code_digest(TRAIN_CODE))
    return {k: run[k] for k in ("run_id", "identity", "step", "images", "data_version", "tracking_uri")}


@task("train")
def train_in_pod(profile: str, sets: Sequence[str], shards: str, model: str, run_file: str) -> dict[str, Any]:
    """`tim train` in this pod (Ray starts in-process with the pod's CPUs or GPUs)."""
    tim("train", *params_args(profile, sets), "--shards", shards, "--out", model, "--run-file", run_file)
    return _mark(profile, sets, run_file)


@task("train")
def train_ray_jobs(address: str, profile: str, sets: Sequence[str], shards: str, model: str,
                   run_file: str) -> dict[str, Any]:
    """`tim train` as a job on the Ray cluster at ``address`` (its dashboard URL)."""
    from components.train.settings import TrainParams
    from components.train.stage import identity_of
    from pipelines import ray_jobs, remote

    params = source(profile, sets).load("train", TrainParams)
    store = tracking(profile, sets)
    store.check()
    identity = identity_of(params, shards)
    with scratch("tim-ray-job-") as folder:
        outcome, submitted = ray_jobs.run(address, shards=Path(shards), params=project_params(), profile=profile,
                                          sets=list(sets), tracking_uri=store.uri, identity=identity,
                                          scratch=folder)
    print(f"Ray job {outcome.submission_id}: {outcome.status}", flush=True)
    if outcome.status != "SUCCEEDED":
        raise TaskFailed(ray_jobs.failure_code(outcome),
                         f"Ray job {outcome.submission_id} on {address} {outcome.status.lower()}"
                         f" (driver exit code {outcome.exit_code}): {outcome.message.strip() or 'see the log above'}")
    run = remote.finished_run(store, params.mlflow.experiment, identity, submitted)
    remote.fetch_training(store, params.mlflow.experiment, run, model, run_file)
    return {**_mark(profile, sets, run_file), "ray_job": outcome.submission_id}


def kuberay_job(profile: str, sets: Sequence[str], shards: str, ray_workers: int, gpus_per_worker: int,
                worker_memory: str, node_selector: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]],
                mlflow_secret: str, s3_secret: str, *, namespace: str,
                image: str) -> tuple[dict[str, Any], str, str]:
    """(the RayJob this run creates, the s3:// URI its working folder goes to, the training identity); nothing
    is created or uploaded."""
    from components.train.settings import TrainParams
    from components.train.stage import identity_of
    from pipelines import kuberay
    from pipelines.remote import train_command

    params = source(profile, sets).load("train", TrainParams)
    identity = identity_of(params, shards)
    name = kuberay.job_name(identity)
    uri = kuberay.working_dir_uri(params.distributed.storage_path, name)
    store = tracking(profile, sets)
    where = kuberay.placement(params, ray_workers, gpus_per_worker, worker_memory, dict(node_selector),
                              list(tolerations))
    job = kuberay.rayjob(name=name, namespace=namespace, image=image,
                         entrypoint=train_command(profile, list(sets), store.uri), where=where, working_dir=uri,
                         tracking_uri=store.uri, mlflow_secret=mlflow_secret, s3_secret=s3_secret)
    return job, uri, identity


@task("train")
def train_kuberay(profile: str, sets: Sequence[str], shards: str, ray_workers: int, gpus_per_worker: int,
                  worker_memory: str, node_selector: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]],
                  mlflow_secret: str, s3_secret: str, model: str, run_file: str) -> dict[str, Any]:
    """`tim train` in a KubeRay RayJob made for this run, followed to its end."""
    import os

    from components.train.settings import TrainParams
    from pipelines import kuberay, remote

    image = os.environ.get(kuberay.IMAGE_ENV, "")
    job, uri, identity = kuberay_job(profile, sets, shards, ray_workers, gpus_per_worker, worker_memory, node_selector,
                           tolerations, mlflow_secret, s3_secret, namespace=kuberay.namespace(), image=image)
    params = source(profile, sets).load("train", TrainParams)
    store = tracking(profile, sets)
    store.check()
    with scratch("tim-rayjob-") as folder:
        kuberay.upload_working_dir(uri, Path(shards), project_params(), folder)
    started = remote.now_ms()
    status = kuberay.run(job)
    succeeded, summary = kuberay.outcome(status)
    name = job["metadata"]["name"]
    if not succeeded:
        raise TaskFailed(kuberay.failure_code(status), f"RayJob {name} did not succeed ({summary}); its logs: "
                                                       f"kubectl -n {job['metadata']['namespace']} logs -l "
                                                       f"ray.io/node-type=head --tail=-1 (cluster of {name})")
    run = remote.finished_run(store, params.mlflow.experiment, identity, started)
    remote.fetch_training(store, params.mlflow.experiment, run, model, run_file)
    return {**_mark(profile, sets, run_file), "rayjob": name}


# --- evaluation, registry ---------------------------------------------------------------------------------------
@task("train-evaluator")
def train_evaluator(profile: str, sets: Sequence[str], shards: str, out: str) -> dict[str, Any]:
    tim("train-evaluator", *params_args(profile, sets), "--shards", shards, "--out", out)
    return {"val_accuracy": json.loads((Path(out) / "config.json").read_text())["val_accuracy"]}


@task("samples")
def samples(profile: str, sets: Sequence[str], model: str, out: str, view: str) -> None:
    tim("samples", *params_args(profile, sets), "--model", model, "--out", out)
    Path(view).write_text(present.grid(Path(out) / "grid.png", "Samples of every class at each step count"))


@task("evaluate")
def evaluate(profile: str, sets: Sequence[str], model: str, evaluator: str, shards: str, run_file: str, out: str,
             report: str, metrics) -> None:
    """`tim evaluate`, then its figures as KFP metrics and its report as HTML."""
    tim("evaluate", *params_args(profile, sets), "--model", model, "--evaluator", evaluator, "--shards", shards,
        "--out", out, "--run-file", run_file)
    result = json.loads((Path(out) / "metrics.json").read_text())
    base = f"{result['cfg_scale']:g}"
    for scale, figures in (result.get("scales") or {base: result}).items():
        suffix = "" if scale == base else f"_cfg{scale}"   # the base scale's figures are the unsuffixed ones
        for key, values in figures["ema"].items():
            for name in ("fid", "kid", "precision", "recall", "accuracy"):
                metrics.log_metric(f"{name}_{key.replace('_', '')}{suffix}", values[name])
        if figures["monotone"]["verdict"] is not None:
            metrics.log_metric(f"fid_monotone{suffix}", float(figures["monotone"]["verdict"]))
    metrics.log_metric("floor_fid", result["floor"]["fid"])
    Path(report).write_text(present.evaluation(Path(out)))


@task("register")
def register(profile: str, sets: Sequence[str], model: str, run_file: str, out: str) -> dict[str, Any]:
    tim("register", *params_args(profile, sets), "--model", model, "--run-file", run_file, "--out", out)
    record = json.loads(Path(out).read_text())
    return {k: record[k] for k in ("name", "version", "model_uri", "run_id", "recommended_nfe")}


@task("promote")
def promote(profile: str, sets: Sequence[str], registered: str, out: str, view: str) -> dict[str, Any]:
    tim("promote", *params_args(profile, sets), "--registered", registered, "--out", out)
    d = json.loads(Path(out).read_text())
    Path(view).write_text(present.decision(d))
    return {"verdict": d["verdict"], "version": d["challenger"]["version"], "aliases": d["aliases"],
            "decided_at": d["decided_at"]}
