"""The Kubeflow pipeline (KFP v2): fingerprint -> prepare -> validate -> shard -> encode -> plan -> train (in the
task's pod, as a Ray Jobs API job, or as a KubeRay RayJob) -> train_evaluator, samples -> evaluate -> register ->
promote.

Every task is a lightweight component in the project's image (chosen when compiling) whose body is one call into
pipelines/tasks.py, which runs the stage's `tim` command with the run's ``--profile`` and ``--set`` overrides.

Caching: `fingerprint` (and `plan`, which reads the registry) always run. The data tasks are cached on a key the
fingerprint task computes from the source's digest, their resolved params section and their code, so an
unchanged source is not processed again and a changed one always is. Training, evaluation, registration and
promotion run every time unless the pipeline is compiled with ``cache_model_tasks`` (then a repeated run with
identical inputs shows the earlier outputs). `plan` skips training, and everything after it, when a registered
version was already trained on the same data with the same params and code.
"""

# No `from __future__ import annotations`: KFP reads the components' annotations as objects.
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

PIPELINE_NAME = "tim"
PARAMS_IN_IMAGE = "/opt/tim/params.yaml"   # where infra/docker/Dockerfile copies params.yaml
CLUSTER_MLFLOW = "http://mlflow:5000"      # the MLflow Service of infra/k8s/base
COMPILED = Path(__file__).resolve().parent / "compiled" / f"{PIPELINE_NAME}.yaml"
MLFLOW_ENV = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
S3_ENV = {"access-key-id": "AWS_ACCESS_KEY_ID", "secret-access-key": "AWS_SECRET_ACCESS_KEY",
          "endpoint-url": "AWS_ENDPOINT_URL", "region": "AWS_DEFAULT_REGION"}
RAY_TOKEN_ENV = {"token": "RAY_AUTH_TOKEN"}
# Pod labels the NetworkPolicies of infra/k8s admit to MLflow and to the dev S3 (docs/deploy.md).
MLFLOW_CLIENT_LABEL, S3_CLIENT_LABEL = "tim-pipeline/mlflow-client", "tim-pipeline/s3-client"


# --- components: each body is one call into pipelines.tasks -------------------------------------------------------
def fingerprint(data_source: str, data_root: str, params_profile: str, params_set: list, train_mode: str,
                ray_workers: int, gpus_per_worker: int, zero_stage: int, init_from: str, nfe_list: list,
                gate: dict, model_name: str, mlflow_tracking_uri: str, source_fingerprint: Output[Artifact]
                ) -> NamedTuple("FingerprintOutputs", [("digest", str), ("sets", list), ("prepare_key", str),
                                                       ("prepare_sets", list), ("validate_key", str),
                                                       ("validate_sets", list), ("shard_key", str),
                                                       ("shard_sets", list), ("encode_key", str),
                                                       ("encode_sets", list)]):
    """Checks the run's parameters against every params.yaml section (a wrong type or an unknown key fails here,
    before any work), then fingerprints the data source with `tim fingerprint` (object keys, sizes and ETags
    for S3; file hashes for a folder; the package version for mnist5k) and computes the data tasks' cache keys.
    Never cached."""
    form = {name: value for name, value in locals().items() if name != "source_fingerprint"}
    from collections import namedtuple

    from pipelines import tasks

    outputs = tasks.fingerprint(form, source_fingerprint.path)
    source_fingerprint.metadata["digest"] = outputs["digest"]
    return namedtuple("FingerprintOutputs", outputs)(**outputs)


def prepare(params_profile: str, sets: list, cache_key: str, prepared: Output[Dataset]):
    """`tim prepare`: raw images to PNGs and a manifest, split train/val. Cached on cache_key (the source's
    fingerprint, the resolved prepare section and the data code)."""
    from pipelines import tasks

    prepared.metadata.update(tasks.prepare(params_profile, sets, prepared.path))


def validate(params_profile: str, sets: list, cache_key: str, prepared: Input[Dataset], validated: Output[Dataset],
             data_docs: Output[HTML]):
    """`tim validate`: the great-expectations suite over the manifest; data_docs shows its data docs."""
    from pipelines import tasks

    tasks.validate(params_profile, sets, prepared.path, validated.path, data_docs.path)


def shard(params_profile: str, sets: list, cache_key: str, prepared: Input[Dataset], validated: Input[Dataset],
          shards: Output[Dataset]):
    """`tim shard`: the validated images as webdataset shards with index.json."""
    from pipelines import tasks

    shards.metadata.update(tasks.shard(params_profile, sets, prepared.path, validated.path, shards.path))


def encode(params_profile: str, sets: list, cache_key: str, shards: Input[Dataset], encoded: Output[Dataset]):
    """`tim encode`: the data training reads, VAE latents of the images (encode.vae) or the images themselves.
    Cached on cache_key (the VAE's files or revision, the resolved encode section and the code)."""
    from pipelines import tasks

    encoded.metadata.update(tasks.encode(params_profile, sets, shards.path, encoded.path))


def plan(params_profile: str, sets: list, shards: Input[Dataset], force_train: bool, summary: Output[Markdown]
         ) -> bool:
    """Whether this run trains: not when a registered version was trained on the same data with the same
    params and code (summary says which), unless force_train. Never cached: it reads the registry."""
    from pipelines import tasks

    return tasks.plan(params_profile, sets, shards.path, force_train, summary.path)


def train_in_pod(params_profile: str, sets: list, shards: Input[Dataset], model: Output[Model],
                 train_run: Output[Artifact]):
    """`tim train` in this task's pod: Ray starts in-process with the pod's CPUs or GPUs."""
    from pipelines import tasks

    model.metadata.update(tasks.train_in_pod(params_profile, sets, shards.path, model.path, train_run.path))


def train_ray_jobs(ray_address: str, params_profile: str, sets: list, shards: Input[Dataset], model: Output[Model],
                   train_run: Output[Artifact]):
    """`tim train` as a Ray Jobs API job on the cluster at ray_address; its logs stream here, the task fails
    when it fails and stops it when cancelled."""
    from pipelines import tasks

    model.metadata.update(tasks.train_ray_jobs(ray_address, params_profile, sets, shards.path, model.path,
                                               train_run.path))


def train_kuberay(params_profile: str, sets: list, shards: Input[Dataset], ray_workers: int, gpus_per_worker: int,
                  worker_memory: str, node_selector: dict, tolerations: list, mlflow_secret: str, s3_secret: str,
                  model: Output[Model], train_run: Output[Artifact]):
    """`tim train` in a KubeRay RayJob rendered from infra/k8s/rayjob for this run, followed to its end."""
    from pipelines import tasks

    model.metadata.update(tasks.train_kuberay(params_profile, sets, shards.path, ray_workers, gpus_per_worker,
                                              worker_memory, node_selector, tolerations, mlflow_secret, s3_secret,
                                              model.path, train_run.path))


def train_evaluator(params_profile: str, sets: list, shards: Input[Dataset], evaluator: Output[Model]):
    """`tim train-evaluator`: the classifier whose features measure sample quality."""
    from pipelines import tasks

    evaluator.metadata.update(tasks.train_evaluator(params_profile, sets, shards.path, evaluator.path))


def samples(params_profile: str, sets: list, model: Input[Model], samples: Output[Artifact], grid: Output[HTML]):
    """`tim samples`: every class at each step count of the samples section."""
    from pipelines import tasks

    tasks.samples(params_profile, sets, model.path, samples.path, grid.path)


def evaluate(params_profile: str, sets: list, model: Input[Model], evaluator: Input[Model], shards: Input[Dataset],
             train_run: Input[Artifact], evaluation: Output[Artifact], report: Output[HTML],
             metrics: Output[Metrics]):
    """`tim evaluate`: FID, KID, precision/recall and accuracy at every NFE; report has the table, the
    FID-vs-NFE plot and the samples."""
    from pipelines import tasks

    tasks.evaluate(params_profile, sets, model.path, evaluator.path, shards.path, train_run.path, evaluation.path,
                   report.path, metrics)


def register(params_profile: str, sets: list, model: Input[Model], train_run: Input[Artifact],
             registered: Output[Artifact]):
    """`tim register`: a new version of the registered model, tagged with its evaluation; no alias moves."""
    from pipelines import tasks

    registered.metadata.update(tasks.register(params_profile, sets, model.path, train_run.path, registered.path))


def promote(params_profile: str, sets: list, registered: Input[Artifact], decision: Output[Artifact],
            reasons: Output[Markdown]):
    """`tim promote`: the champion/challenger gate; reasons lists every check with its figures."""
    from pipelines import tasks

    decision.metadata.update(tasks.promote(params_profile, sets, registered.path, decision.path, reasons.path))


# --- the pipeline -------------------------------------------------------------------------------------------------
def build(image: str, *, params_path: str = PARAMS_IN_IMAGE, mlflow_tracking_uri: str = CLUSTER_MLFLOW,
          cache_model_tasks: bool = False):
    """The pipeline for ``image``; tasks read params.yaml at ``params_path``; the run form's MLflow default is
    ``mlflow_tracking_uri``."""
    from components.common.errors import UserError

    if not image or any(c.isspace() for c in image):
        raise UserError(f"--image: the project's image (e.g. registry.example.com/tim-pipeline:0.1.0-gpu); got "
                        f"{image!r}")

    def op(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    ops = {f.__name__: op(f) for f in (fingerprint, prepare, validate, shard, encode, plan, train_in_pod,
                                       train_ray_jobs, train_kuberay, train_evaluator, samples, evaluate, register,
                                       promote)}

    def setup(t, name: str, *, cache: bool, mlflow_secret=None, s3_secret=None, ray_token_secret=None):
        t.set_display_name(name).set_caching_options(cache).set_env_variable("TIM_PARAMS", params_path)
        if mlflow_secret is not None:
            kubernetes.use_secret_as_env(t, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_ENV, optional=True)
            kubernetes.add_pod_label(t, MLFLOW_CLIENT_LABEL, "true")
        if s3_secret is not None:
            kubernetes.use_secret_as_env(t, secret_name=s3_secret, secret_key_to_env=S3_ENV, optional=True)
            kubernetes.add_pod_label(t, S3_CLIENT_LABEL, "true")
        if ray_token_secret is not None:
            kubernetes.use_secret_as_env(t, secret_name=ray_token_secret, secret_key_to_env=RAY_TOKEN_ENV,
                                         optional=True)
        return t

    @dsl.pipeline(name="judge", description="Samples, evaluation at every NFE, registration and the promotion gate "
                                            "of a trained model.")
    def judge(params_profile: str, sets: list, shards: Input[Dataset], evaluator: Input[Model], model: Input[Model],
              train_run: Input[Artifact], mlflow_secret: str):
        setup(ops["samples"](params_profile=params_profile, sets=sets, model=model), "samples",
              cache=cache_model_tasks)
        evaluated = setup(ops["evaluate"](params_profile=params_profile, sets=sets, model=model, evaluator=evaluator,
                                          shards=shards, train_run=train_run),
                          "evaluate", cache=cache_model_tasks, mlflow_secret=mlflow_secret)
        registered = setup(ops["register"](params_profile=params_profile, sets=sets, model=model,
                                           train_run=train_run),
                           "register", cache=cache_model_tasks, mlflow_secret=mlflow_secret).after(evaluated)
        setup(ops["promote"](params_profile=params_profile, sets=sets, registered=registered.outputs["registered"]),
              "promote", cache=cache_model_tasks, mlflow_secret=mlflow_secret)

    @dsl.pipeline(name=PIPELINE_NAME, description="Transition Models (TiM): data -> train -> evaluate at many NFEs "
                                                   "-> register -> champion/challenger gate.")
    def tim_pipeline(
        data_source: str = "",
        data_root: str = "",
        params_profile: str = "",
        params_set: list = [],  # noqa: B006 - KFP reads the default from the signature
        force_train: bool = False,
        train_mode: str = "in_pod",
        ray_address: str = "",
        ray_workers: int = 0,
        gpus_per_worker: int = 0,
        zero_stage: int = -1,
        worker_memory: str = "16Gi",
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
        init_from: str = "",
        nfe_list: list = [],  # noqa: B006
        gate: dict = {},  # noqa: B006
        model_name: str = "",
        mlflow_tracking_uri: str = mlflow_tracking_uri,
        mlflow_secret: str = "mlflow-client",
        s3_secret: str = "tim-s3",
        ray_token_secret: str = "ray-token",
    ):
        """The run form: every field has a default that keeps params.yaml's choice or the cluster's names.

        Args:
            data_source: Where the images come from: mnist5k (bundled digits), imagefolder (a folder the
                task can read) or s3 (root s3://bucket/prefix, one sub-folder per class). Empty:
                params.yaml's prepare.source.
            data_root: The folder or s3://bucket/prefix of imagefolder and s3 sources. Empty:
                params.yaml's prepare.root.
            params_profile: Profile of params.yaml for every section that defines it (cpu-tiny, cpu, gpu).
                Empty: each section's own.
            params_set: Overrides, as `tim --set` takes them: ["train.optim.global_batch=128",
                "evaluate.samples_per_class=50"]. Applied after the profile; the fields of this form win
                over them.
            force_train: Train even when a registered version was trained on the same data with the same
                params and code.
            train_mode: Where training runs: in_pod (Ray inside this task's pod, for small runs), ray_jobs
                (a job on the Ray cluster at ray_address) or kuberay (a RayJob created for this run).
            ray_address: ray_jobs: the Ray dashboard URL of the cluster, e.g. http://raycluster-head-svc:8265.
            ray_workers: Ray workers: processes on CPU, worker pods with GPUs (kuberay); one Ray Train
                worker per GPU. 0: params.yaml's train.distributed.num_workers.
            gpus_per_worker: GPUs per worker (in_pod: the pod's GPUs); 0 trains on CPU.
            zero_stage: DeepSpeed ZeRO stage 0-3. -1: params.yaml's train.distributed.zero_stage.
            worker_memory: kuberay: memory of each worker pod (a Kubernetes quantity).
            node_selector: Node labels for the GPU training pods (in_pod: the task's pod; kuberay: the
                workers), e.g. {"nvidia.com/gpu.present": "true"}. Empty: none (kuberay: the template's
                for GPU workers).
            tolerations: Tolerations for those pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"}].
            init_from: Warm start: models:/NAME@champion, models:/NAME/VERSION or a folder with
                model.safetensors + config.json. Empty: from scratch.
            nfe_list: Step counts to evaluate, e.g. [1, 2, 4, 8]. Empty: params.yaml's evaluate.steps.
            gate: Promotion gate thresholds (keys of params.yaml's registry.gate), e.g.
                {"min_rel_improvement": 0.05, "max": {"fid": 60}}. Empty: params.yaml's.
            model_name: Registered model name in MLflow. Empty: params.yaml's registry.model_name.
            mlflow_tracking_uri: The MLflow tracking server every task logs to. Empty: params.yaml's, else
                the task's MLFLOW_TRACKING_URI.
            mlflow_secret: Name of the Kubernetes Secret with the MLflow user (keys username, password).
            s3_secret: Name of the Kubernetes Secret with the S3 key pair (keys access-key-id,
                secret-access-key; optional endpoint-url, region).
            ray_token_secret: ray_jobs: name of the Kubernetes Secret with the Ray cluster's auth token
                (key token), if it uses token authentication.
        """
        fp = setup(ops["fingerprint"](
            data_source=data_source, data_root=data_root, params_profile=params_profile, params_set=params_set,
            train_mode=train_mode, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker, zero_stage=zero_stage,
            init_from=init_from, nfe_list=nfe_list, gate=gate, model_name=model_name,
            mlflow_tracking_uri=mlflow_tracking_uri), "fingerprint", cache=False, s3_secret=s3_secret)
        sets = fp.outputs["sets"]
        prepared = setup(ops["prepare"](params_profile=params_profile, sets=fp.outputs["prepare_sets"],
                                        cache_key=fp.outputs["prepare_key"]),
                         "prepare", cache=True, s3_secret=s3_secret)
        validated = setup(ops["validate"](params_profile=params_profile, sets=fp.outputs["validate_sets"],
                                          cache_key=fp.outputs["validate_key"],
                                          prepared=prepared.outputs["prepared"]), "validate", cache=True)
        sharded = setup(ops["shard"](params_profile=params_profile, sets=fp.outputs["shard_sets"],
                                     cache_key=fp.outputs["shard_key"], prepared=prepared.outputs["prepared"],
                                     validated=validated.outputs["validated"]), "shard", cache=True)
        shards = sharded.outputs["shards"]
        encoded = setup(ops["encode"](params_profile=params_profile, sets=fp.outputs["encode_sets"],
                                      cache_key=fp.outputs["encode_key"], shards=shards), "encode", cache=True)
        data = encoded.outputs["encoded"]   # what training reads; the image shards stay the evaluation's reference
        planned = setup(ops["plan"](params_profile=params_profile, sets=sets, shards=data, force_train=force_train),
                        "plan", cache=False, mlflow_secret=mlflow_secret)
        with dsl.If(planned.outputs["Output"] == True, "new-data-params-or-code"):  # noqa: E712 - a KFP condition
            evaluator = setup(ops["train_evaluator"](params_profile=params_profile, sets=sets, shards=shards),
                              "train_evaluator", cache=cache_model_tasks)
            judged = dict(params_profile=params_profile, sets=sets, shards=shards,
                          evaluator=evaluator.outputs["evaluator"], mlflow_secret=mlflow_secret)
            # Each training mode hands its model to the same sub-pipeline: kfp.local merges exclusive branches'
            # parameters (dsl.OneOf) but not their artifacts.
            with dsl.If(train_mode == "in_pod", "in-pod"):
                in_pod = setup(ops["train_in_pod"](params_profile=params_profile, sets=sets, shards=data),
                               "train (in pod)", cache=cache_model_tasks, mlflow_secret=mlflow_secret,
                               s3_secret=s3_secret)
                in_pod.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_worker)
                kubernetes.add_node_selector_json(in_pod, node_selector)
                kubernetes.add_toleration_json(in_pod, tolerations)
                judge(model=in_pod.outputs["model"], train_run=in_pod.outputs["train_run"],
                      **judged).set_caching_options(cache_model_tasks)
            with dsl.Elif(train_mode == "ray_jobs", "ray-jobs"):
                on_ray = setup(ops["train_ray_jobs"](ray_address=ray_address, params_profile=params_profile,
                                                     sets=sets, shards=data),
                               "train (Ray Jobs API)", cache=cache_model_tasks, mlflow_secret=mlflow_secret,
                               ray_token_secret=ray_token_secret)
                judge(model=on_ray.outputs["model"], train_run=on_ray.outputs["train_run"],
                      **judged).set_caching_options(cache_model_tasks)
            with dsl.Else("kuberay"):
                on_kuberay = setup(ops["train_kuberay"](
                    params_profile=params_profile, sets=sets, shards=data, ray_workers=ray_workers,
                    gpus_per_worker=gpus_per_worker, worker_memory=worker_memory, node_selector=node_selector,
                    tolerations=tolerations, mlflow_secret=mlflow_secret, s3_secret=s3_secret),
                    "train (KubeRay RayJob)", cache=cache_model_tasks, mlflow_secret=mlflow_secret,
                    s3_secret=s3_secret)
                on_kuberay.set_env_variable("TIM_IMAGE", image)
                judge(model=on_kuberay.outputs["model"], train_run=on_kuberay.outputs["train_run"],
                      **judged).set_caching_options(cache_model_tasks)

    return tim_pipeline


def compile_to(path: str | Path, image: str, **options) -> Path:
    """Compile the pipeline for ``image`` to ``path`` (YAML: the pipeline spec, then the Kubernetes settings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(image, **options), str(path))
    return path
