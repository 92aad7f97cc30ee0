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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
def train(
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
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
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
    evaluator: Path = typer.Option(Path("models/evaluator"), help="Output of `tim train-evaluator`."),
    out: Path = typer.Option(Path("runs/compare"), help="Output folder: a model and evaluation per objective, "
                                                         "table.md, fid_vs_nfe.png."),
    params: Path = PARAMS, profile: str = PROFILE, set_: list[str] = SET,
) -> None:
    """Train flow matching, MeanFlow and TiM alike, evaluate all three at the same NFEs, tabulate and plot."""
    from components.evaluation.compare import CompareParams
    from components.evaluation.compare import compare as stage

    src = source(params, profile, set_)
    print(stage(src.load("compare", CompareParams), src, shards, evaluator, out, tracking=tracking(src)))


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


if __name__ == "__main__":
    app()
