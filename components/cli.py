"""`tim` command line: one thin command per pipeline stage. Each resolves its params section in one place
(params.yaml, ``--profile``, ``--set``; components/common/params.py) and calls the stage function, the same one
the Kubeflow tasks call.

Heavy libraries (great_expectations, webdataset, boto3, torch, mlflow) are imported inside the stage modules or
the commands, so `tim --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from components.common.errors import TimError
from components.common.params import ParamsSource


class TimApp(typer.Typer):
    """Typer app that turns known errors into `error: <message>` on stderr and their exit code (2: fix the
    input; 75: a service or a race, retry)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except TimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)


app = TimApp(help="Transition Models (TiM) pipeline.", no_args_is_help=True, add_completion=False)
params_app = typer.Typer(help="Show the params a command would run with.", no_args_is_help=True)
app.add_typer(params_app, name="params")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml; each stage reads its own section.")
PROFILE = typer.Option(None, "--profile", help="Profile to use in every section that defines it (e.g. cpu-tiny).")
SET = typer.Option([], "--set", help="Override one key after the profile: section.key=value (YAML value); "
                                     "repeatable.")


def source(params: Path, profile: str | None, sets: list[str]) -> ParamsSource:
    return ParamsSource(params, profile, tuple(sets))


def tracking(src: ParamsSource):
    """The MLflow store of this command: one rule for every stage (components/common/tracking.py)."""
    from components.common.tracking import MlflowParams, Tracking

    return Tracking.resolve(src.load("mlflow", MlflowParams), src.project_dir)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    # Our own progress at INFO; libraries (great_expectations is chatty) only when they warn, unless -v.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("components").setLevel(logging.DEBUG if verbose else logging.INFO)


@params_app.command("show")
def params_show(section: str = typer.Argument(..., help="Section of params.yaml, e.g. train."),
                params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET) -> None:
    """Print a section as the stage would read it (profile and --set applied), as YAML."""
    import yaml

    print(yaml.safe_dump(source(params, profile, set_).section(section), sort_keys=False).rstrip())


@app.command()
def prepare(
    out: Path = typer.Option(Path("data/prepared"), help="Output folder: images/, manifest.csv, dataset.json."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Read raw images (mnist5k, imagefolder or s3), split train/val, write PNGs and a manifest."""
    from components.data.prepare import PrepareParams
    from components.data.prepare import prepare as stage

    stage(source(params, profile, set_).load("prepare", PrepareParams), out)


@app.command()
def validate(
    prepared: Path = typer.Option(Path("data/prepared"), help="Output of `tim prepare`."),
    out: Path = typer.Option(Path("data/validated"), help="Output folder: result.json, docs/, validated manifest."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Check the manifest with great-expectations; fails (exit 2) naming each failed expectation."""
    from components.data.validate import ValidateParams
    from components.data.validate import validate as stage

    stage(source(params, profile, set_).load("validate", ValidateParams), prepared, out)


@app.command()
def shard(
    prepared: Path = typer.Option(Path("data/prepared"), help="Output of `tim prepare` (the images)."),
    validated: Path = typer.Option(Path("data/validated"), help="Output of `tim validate` (the gate)."),
    out: Path = typer.Option(Path("data/shards"), help="Output folder: index.json, train/, val/ tar shards."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Pack validated images into webdataset tar shards per split, with index.json."""
    from components.data.shard import ShardParams
    from components.data.shard import shard as stage

    stage(source(params, profile, set_).load("shard", ShardParams), prepared, validated, out)


@app.command()
def encode(
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard` (the images)."),
    out: Path = typer.Option(Path("data/encoded"), help="Output folder: the shards training reads (latents with "
                                                         "vae/, or the images linked), index.json."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Encode the image shards into VAE latent shards (encode.vae), or pass the images on (no VAE)."""
    from components.data.encode import EncodeParams
    from components.data.encode import encode as stage

    stage(source(params, profile, set_).load("encode", EncodeParams), shards, out)


@app.command("standin-vae")
def standin_vae(
    out: Path = typer.Option(Path("models/standin-vae"), help="Output folder (a diffusers AutoencoderKL)."),
    channels: int = typer.Option(1, help="Image channels (1: the bundled digits)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a small random-weight VAE that stands in for a downloaded one, to try the latent path offline."""
    from components.data.encode import standin_vae as make

    print(make(out, channels, seed))


@app.command()
def train(
    shards: Path = typer.Option(Path("data/encoded"), help="Output of `tim encode` (latents or images)."),
    out: Path = typer.Option(Path("models/tim"), help="Output folder: EMA weights (model.safetensors, config.json)."),
    run_file: Path = typer.Option(Path("models/train_run.json"), help="JSON naming the MLflow run and final step."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Train with Ray Train + DeepSpeed ZeRO, tracked in MLflow; rerunning resumes from the last checkpoint."""
    from components.train.settings import TrainParams
    from components.train.stage import train as stage

    src = source(params, profile, set_)
    stage(src.load("train", TrainParams), shards, out, run_file, tracking=tracking(src), project_dir=src.project_dir)


@app.command()
def samples(
    model: Path = typer.Option(Path("models/tim"), help="Exported model folder (model.safetensors, config.json)."),
    out: Path = typer.Option(Path("runs/samples"), help="Output folder; gets grid.png."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Write one PNG with samples of every class (rows) at each step count (panels) of the samples section."""
    from components.evaluation.grid import SamplesParams
    from components.evaluation.grid import samples as stage

    settings = source(params, profile, set_).load("samples", SamplesParams)
    path = stage(settings, model, out)
    print(f"sample grid ({', '.join(map(str, settings.steps))} steps): {path}")


@app.command("train-evaluator")
def train_evaluator(
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
    out: Path = typer.Option(Path("models/evaluator"), help="Output folder: model.safetensors, config.json."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Train the small classifier whose features measure sample quality (FID, KID, precision/recall)."""
    from components.evaluation.feature_net import EvaluatorParams
    from components.evaluation.feature_net import train_evaluator as stage

    config = stage(source(params, profile, set_).load("train_evaluator", EvaluatorParams), shards, out)
    print(f"evaluator: validation accuracy {config['val_accuracy']:.4f}; saved to {out}")


@app.command()
def evaluate(
    model: str = typer.Option("models/tim", help="Exported model folder, or an MLflow URI (runs:/ID/model, "
                                                  "models:/NAME@ALIAS)."),
    evaluator: Path = typer.Option(Path("models/evaluator"), help="Output of `tim train-evaluator`."),
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard` (reference and floor)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Output folder: metrics.json, per_nfe.csv, plots."),
    run_file: Path = typer.Option(None, help="models/train_run.json: the MLflow run to log to."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Sample quality at every step count (FID, KID, precision/recall, accuracy, speed), logged to MLflow."""
    from components.evaluation.evaluate import EvaluateParams
    from components.evaluation.evaluate import evaluate as stage

    src = source(params, profile, set_)
    result = stage(src.load("evaluate", EvaluateParams), model, evaluator, shards, out, run_file,
                   tracking=tracking(src))
    verdict = result["monotone"]["verdict"]
    for key, values in result["ema"].items():
        print(f"{key}: FID {values['fid']:.2f}  accuracy {values['accuracy']:.3f}")
    print(f"floor FID {result['floor']['fid']:.2f}; FID within noise as NFE grows: {verdict}; report in {out}")


@app.command()
def compare(
    data: Path = typer.Option(Path("data/encoded"), help="Training data: output of `tim encode`."),
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard` (evaluation reference)."),
    evaluator: Path = typer.Option(Path("models/evaluator"), help="Output of `tim train-evaluator`."),
    out: Path = typer.Option(Path("runs/compare"), help="Output folder: a model and evaluation per objective, "
                                                         "table.md, fid_vs_nfe.png."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Train flow matching, MeanFlow and TiM alike, evaluate all three at the same NFEs, tabulate and plot."""
    from components.evaluation.compare import CompareParams
    from components.evaluation.compare import compare as stage

    src = source(params, profile, set_)
    print(stage(src.load("compare", CompareParams), src, shards, evaluator, out, tracking=tracking(src),
                data_dir=data))


@app.command()
def register(
    model: Path = typer.Option(Path("models/tim"), help="Exported EMA model (model.safetensors, config.json)."),
    run_file: Path = typer.Option(Path("models/train_run.json"), help="The training run (its evaluation is read)."),
    out: Path = typer.Option(Path("models/registered.json"), help="JSON naming the new model version."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Register the EMA model as a new MLflow model version (pyfunc), tagged with its evaluation."""
    from components.registry.client import RegistryParams
    from components.registry.register import register as stage

    src = source(params, profile, set_)
    result = stage(src.load("registry", RegistryParams), model, run_file, out, tracking=tracking(src),
                   project_dir=src.project_dir)
    print(f"registered {result['model_uri']} (recommended NFE {result['recommended_nfe']}); no alias set yet: "
          "run `tim promote`")


def _open_hint(uri: str, name: str) -> str:
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_relative_to(Path.cwd()):  # the project's own store: the short form a user can retype
            uri = f"sqlite:///{db.relative_to(Path.cwd())}"
        return f"mlflow ui --backend-store-uri {uri}   (then Models > {name})"
    return f"{uri.rstrip('/')}/#/models/{name}"


@app.command()
def promote(
    registered: Path = typer.Option(Path("models/registered.json"), help="Written by `tim register`."),
    version: str = typer.Option(None, help="Judge this version instead of the one in --registered."),
    out: Path = typer.Option(Path("runs/promote/decision.json"), help="The decision as JSON."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Champion/challenger gate: the version becomes `champion` only if it passes and beats the champion."""
    from components.registry.client import RegistryParams
    from components.registry.promote import promote as stage
    from components.registry.promote import registered_version

    src = source(params, profile, set_)
    settings, store = src.load("registry", RegistryParams), tracking(src)
    d = stage(settings, version or registered_version(settings, registered, store), out, tracking=store)
    print(f"{d['model']} version {d['challenger']['version']}: {d['verdict'].upper()}")
    for check in d["checks"]:
        print(f"  [{'pass' if check['passed'] else 'FAIL'}] {check['check']}: {check['detail']}")
    champion = d["aliases"].get("champion")
    side = d["challenger"] if champion == d["challenger"]["version"] else d["champion"]
    if side:
        gate = d["rule"]
        figures = ", ".join(f"NFE {n}: {gate['metric']} {side['figures'][f'nfe_{n}'][gate['metric']]:.4g}"
                            for n in gate["nfe"] if f"nfe_{n}" in side["figures"])
        print(f"champion: version {champion} ({figures})")
    print(f"aliases: {d['aliases']}; decision: {out}")
    print(f"open it: {_open_hint(d['tracking_uri'], d['model'])}")


@app.command()
def rollback(
    out: Path = typer.Option(Path("runs/promote/rollback.json"), help="The rollback record as JSON."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Give `champion` back to the `previous` version."""
    from components.registry.client import RegistryParams
    from components.registry.promote import rollback as stage

    src = source(params, profile, set_)
    d = stage(src.load("registry", RegistryParams), out, tracking=tracking(src))
    print(f"{d['model']}: champion rolled back from version {d['from']} to {d['to']}; aliases: {d['aliases']}")


@app.command()
def generate(
    model: str = typer.Option(..., help="A registered model URI, e.g. models:/tim-mnist@champion."),
    label: int = typer.Option(..., help="Class to draw."),
    nfe: int = typer.Option(None, help="Transitions per image; default: the version's recommended NFE."),
    num_images: int = typer.Option(8, help="Images in the row."),
    guidance_scale: float = typer.Option(None, help="Classifier-free guidance; default: the evaluation's."),
    seed: int = typer.Option(0, help="Noise seed."),
    out: Path = typer.Option(Path("grid.png"), help="Output PNG (one row of images)."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Draw images of one class from a registered model (the pyfunc that `mlflow models serve` serves)."""
    from components.registry.generate import generate as draw

    result = draw(model, label, nfe, num_images, guidance_scale, seed, out,
                  tracking=tracking(source(params, profile, set_)))
    print(f"recommended NFE: {result.recommended_nfe}")
    print(f"{num_images} images of class {label} at NFE {result.nfe}: {result.path}")


@app.command()
def fingerprint(
    out: Path = typer.Option(Path("data/fingerprint.json"), help="Output JSON: source, root, item count, digest."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Content hash of the source `prepare` reads (S3 keys, sizes and ETags; folder file hashes; mnist5k's package
    version), written without time stamps: an unchanged source gives the same file."""
    from components.data.fingerprint import write_fingerprint
    from components.data.prepare import PrepareParams

    result = write_fingerprint(source(params, profile, set_).load("prepare", PrepareParams), out)
    where = f"{result['source']} {result['root']}" if result["root"] else result["source"]
    print(f"{where}: fingerprint {result['digest'][:12]} ({result['items']} items) in {out}")


# --- the Kubeflow pipeline (pipelines/): compile, run here, submit, schedule ------------------------------------
pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, run locally, submit, schedule.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
PARAM = typer.Option([], "--param", help="A run-form parameter: name=value (YAML value), e.g. train_mode=ray_jobs; "
                                         "repeatable (`tim pipeline compile` lists them in the YAML).")
HOST = typer.Option(None, "--host", envvar="KF_PIPELINES_ENDPOINT",
                    help="KFP API endpoint, e.g. http://localhost:8080; default: $KF_PIPELINES_ENDPOINT, else the "
                         "kube config / in-cluster service account.")
NAMESPACE = typer.Option(None, help="Kubeflow profile namespace (multi-user Kubeflow).")
EXPERIMENT = typer.Option("tim", help="KFP experiment of the runs.")
SERVICE_ACCOUNT = typer.Option("tim-pipeline", help="Service account of the run's pods (infra/k8s: tim-pipeline).")
PACKAGE = typer.Option(None, help="Compiled pipeline YAML; default: pipelines/compiled/tim.yaml, or a fresh "
                                  "compile for --image.")
IMAGE = typer.Option(None, help="The project's image, with its tag (e.g. registry.example.com/tim-pipeline:0.1.0-gpu).")


@pipeline_app.command("compile")
def pipeline_compile(
    image: str = typer.Option(..., help="The project's image the tasks run, with its tag."),
    out: Path = typer.Option(None, help="Output YAML; default: pipelines/compiled/tim.yaml."),
    params_in_image: str = typer.Option("/opt/tim/params.yaml", help="Where params.yaml is inside the image."),
    cache_model_tasks: bool = typer.Option(False, help="Let KFP cache training, evaluation and promotion too."),
) -> None:
    """Compile the pipeline to YAML (upload it in the KFP UI, or `tim pipeline submit`)."""
    from pipelines.pipeline import COMPILED, compile_to

    path = compile_to(out or COMPILED, image, params_path=params_in_image, cache_model_tasks=cache_model_tasks)
    print(f"compiled for {image}: {path}")


@pipeline_app.command("run-local")
def pipeline_run_local(
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET, param: list[str] = PARAM,
    pipeline_root: Path = typer.Option(Path("runs/pipeline"), help="Where the tasks' outputs go."),
    cache_model_tasks: bool = typer.Option(False, help="Let the local cache cover training and evaluation too."),
) -> None:
    """Run the whole pipeline here with kfp.local (a subprocess per task, this environment) and print where the
    outputs are. `--profile` and `--set` are the run's params_profile and params_set."""
    from pipelines.inputs import parse_pairs
    from pipelines.local import run_local, summary

    run = run_local(params=params, pipeline_root=pipeline_root, profile=profile, sets=tuple(set_),
                    form=parse_pairs(param), cache_model_tasks=cache_model_tasks)
    print(summary(run))


def _package_and_arguments(package: Path | None, image: str | None, params: Path, profile: str | None,
                           sets: list[str], param: list[str], scratch: Path) -> tuple[Path, dict]:
    """The compiled YAML to upload (``--package``, a fresh compile for ``--image``, else the committed one) and
    the run's arguments, checked against its form and against params.yaml before anything is sent."""
    from pipelines.inputs import form_arguments, form_values, parse_pairs, validated_overrides
    from pipelines.kfp_client import form_of, read_package
    from pipelines.pipeline import COMPILED, compile_to

    if package is None:
        package = compile_to(scratch / "tim.yaml", image) if image is not None else COMPILED
    form = form_of(read_package(package))
    args = form_arguments(form, parse_pairs(param))
    if profile:
        args["params_profile"] = profile
    if sets:
        args["params_set"] = list(sets)
    validated_overrides(form_values(form, args), params)
    return package, args


@pipeline_app.command("submit")
def pipeline_submit(
    host: str = HOST, namespace: str = NAMESPACE, experiment: str = EXPERIMENT, package: Path = PACKAGE,
    image: str = IMAGE, run_name: str = typer.Option(None, help="Run name; default: tim <date time>."),
    service_account: str = SERVICE_ACCOUNT, params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
    param: list[str] = PARAM,
) -> None:
    """Upload the pipeline (a new version when it exists) and start a run in an experiment."""
    import tempfile

    from pipelines.kfp_client import submit
    from pipelines.pipeline import PIPELINE_NAME

    with tempfile.TemporaryDirectory(prefix="tim-submit-") as tmp:
        package, args = _package_and_arguments(package, image, params, profile, set_, param, Path(tmp))
        run = submit(host=host, namespace=namespace, package=package, pipeline_name=PIPELINE_NAME,
                     experiment=experiment, run_name=run_name, args=args, service_account=service_account)
    print(f"run {run['run_id']} ({run['run_name']}) of pipeline {PIPELINE_NAME} version {run['version']} in "
          f"experiment {experiment}")


@pipeline_app.command("schedule")
def pipeline_schedule(
    cron: str = typer.Option(..., help="KFP cron, 6 fields with seconds first: '0 0 3 * * 1' = Mondays 03:00."),
    name: str = typer.Option("tim-retrain", help="Name of the recurring run (one of a name: it is replaced)."),
    host: str = HOST, namespace: str = NAMESPACE, experiment: str = EXPERIMENT, package: Path = PACKAGE,
    image: str = IMAGE, service_account: str = SERVICE_ACCOUNT, params: Path = PARAMS, profile: str = PROFILE,
    set_: list[str] = SET, param: list[str] = PARAM,
) -> None:
    """Retrain on a schedule: a recurring run of the pipeline's latest version, one run at a time, no catch-up."""
    import tempfile

    from pipelines.kfp_client import schedule
    from pipelines.pipeline import PIPELINE_NAME

    with tempfile.TemporaryDirectory(prefix="tim-schedule-") as tmp:
        package, args = _package_and_arguments(package, image, params, profile, set_, param, Path(tmp))
        made = schedule(host=host, namespace=namespace, package=package, pipeline_name=PIPELINE_NAME,
                        experiment=experiment, job_name=name, cron=cron, args=args, service_account=service_account)
    replaced = f"; replaced {', '.join(made['replaced'])}" if made["replaced"] else ""
    print(f"scheduled {name} ({made['recurring_run_id']}): '{made['cron']}', latest version of pipeline "
          f"{PIPELINE_NAME}, one run at a time, no catch-up{replaced}")


@pipeline_app.command("unschedule")
def pipeline_unschedule(
    name: str = typer.Option("tim-retrain", help="Name of the recurring run to delete."),
    host: str = HOST, namespace: str = NAMESPACE, experiment: str = EXPERIMENT,
) -> None:
    """Delete the recurring run made by `tim pipeline schedule`."""
    from pipelines.kfp_client import unschedule

    ids = unschedule(host=host, namespace=namespace, experiment=experiment, job_name=name)
    print(f"deleted recurring run {', '.join(ids)}" if ids else f"no recurring run named {name} in {experiment}")


if __name__ == "__main__":
    app()
