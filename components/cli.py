"""`tim` command line: one thin command per pipeline stage, each calling components/<stage>.py.

Heavy libraries (great_expectations, webdataset, boto3, torch) are imported inside the stage modules'
functions or the commands, so `tim --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from components.errors import TimError


class TimApp(typer.Typer):
    """Typer app that turns user-fixable errors into `error: <message>` on stderr and exit status 2."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except TimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)


app = TimApp(help="Transition Models (TiM) pipeline.", no_args_is_help=True, add_completion=False)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml; each stage reads its own section.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    # Our own progress at INFO; libraries (great_expectations is chatty) only when they warn, unless -v.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("components").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def prepare(
    params: Path = PARAMS,
    out: Path = typer.Option(Path("data/prepared"), help="Output folder: images/, manifest.csv, dataset.json."),
) -> None:
    """Read raw images (mnist5k, imagefolder or s3), split train/val, write PNGs and a manifest."""
    from components import prepare as stage

    stage.run(params, out)


@app.command()
def validate(
    params: Path = PARAMS,
    prepared: Path = typer.Option(Path("data/prepared"), help="Output of `tim prepare`."),
    out: Path = typer.Option(Path("data/validated"), help="Output folder: result.json, docs/, validated manifest."),
) -> None:
    """Check the manifest with great-expectations; fails (exit 2) naming each failed expectation."""
    from components import validate as stage

    stage.run(params, prepared, out)


@app.command()
def shard(
    params: Path = PARAMS,
    prepared: Path = typer.Option(Path("data/prepared"), help="Output of `tim prepare` (the images)."),
    validated: Path = typer.Option(Path("data/validated"), help="Output of `tim validate` (the gate)."),
    out: Path = typer.Option(Path("data/shards"), help="Output folder: index.json, train/, val/ tar shards."),
) -> None:
    """Pack validated images into webdataset tar shards per split, with index.json."""
    from components import shard as stage

    stage.run(params, prepared, validated, out)


@app.command()
def train(
    params: Path = PARAMS,
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
    out: Path = typer.Option(Path("models/tim"), help="Output folder: EMA weights (model.safetensors, config.json)."),
    run_file: Path = typer.Option(Path("models/train_run.json"), help="JSON naming the MLflow run and final step."),
) -> None:
    """Train with Ray Train + DeepSpeed ZeRO, tracked in MLflow; rerunning resumes from the last checkpoint."""
    from components import train as stage

    stage.run(params, shards, out, run_file)


@app.command()
def samples(
    model: Path = typer.Option(Path("models/tim"), help="Exported model folder (model.safetensors, config.json)."),
    out: Path = typer.Option(Path("runs/samples"), help="Output folder; gets grid.png."),
    nfe: str = typer.Option("1,2,4,8,32", help="Comma-separated step counts, one panel each."),
    per_class: int = typer.Option(8, help="Samples per class (columns of each panel)."),
    cfg_scale: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = off; >1 doubles NFE)."),
    seed: int = typer.Option(0, help="Noise seed, shared by every panel."),
) -> None:
    """Write one PNG with samples of every class (rows) at each step count (panels)."""
    from components import samples as stage

    try:
        steps = [int(s) for s in nfe.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--nfe must be comma-separated integers; got {nfe!r}") from None
    path = stage.run(model, out, steps, per_class, cfg_scale, seed)
    print(f"sample grid ({', '.join(map(str, steps))} steps): {path}")


@app.command("train-evaluator")
def train_evaluator(
    params: Path = PARAMS,
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
    out: Path = typer.Option(Path("models/evaluator"), help="Output folder: model.safetensors, config.json."),
) -> None:
    """Train the small classifier whose features measure sample quality (FID, KID, precision/recall)."""
    from components import evaluator as stage

    config = stage.run(params, shards, out)
    print(f"evaluator: validation accuracy {config['val_accuracy']:.4f}; saved to {out}")


@app.command()
def evaluate(
    params: Path = PARAMS,
    model: str = typer.Option("models/tim", help="Exported model folder, or an MLflow URI (runs:/ID/model, "
                                                  "models:/NAME@ALIAS)."),
    evaluator: Path = typer.Option(Path("models/evaluator"), help="Output of `tim train-evaluator`."),
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard` (reference and floor)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Output folder: metrics.json, per_nfe.csv, plots."),
    run_file: Path = typer.Option(None, help="models/train_run.json: the MLflow run to log to."),
) -> None:
    """Sample quality at every step count (FID, KID, precision/recall, accuracy, speed), logged to MLflow."""
    from components import evaluate as stage

    result = stage.run(params, model, evaluator, shards, out, run_file)
    verdict = result["monotone"]["verdict"]
    for key, values in result["ema"].items():
        print(f"{key}: FID {values['fid']:.2f}  accuracy {values['accuracy']:.3f}")
    print(f"floor FID {result['floor']['fid']:.2f}; FID within noise as NFE grows: {verdict}; report in {out}")


@app.command()
def compare(
    params: Path = PARAMS,
    shards: Path = typer.Option(Path("data/shards"), help="Output of `tim shard`."),
    evaluator: Path = typer.Option(Path("models/evaluator"), help="Output of `tim train-evaluator`."),
    out: Path = typer.Option(Path("runs/compare"), help="Output folder: a model and evaluation per objective, "
                                                         "table.md, fid_vs_nfe.png."),
) -> None:
    """Train flow matching, MeanFlow and TiM alike, evaluate all three at the same NFEs, tabulate and plot."""
    from components import compare as stage

    table = stage.run(params, shards, evaluator, out)
    print(table)


@app.command()
def register(
    params: Path = PARAMS,
    model: Path = typer.Option(Path("models/tim"), help="Exported EMA model (model.safetensors, config.json)."),
    run_file: Path = typer.Option(Path("models/train_run.json"), help="The training run (its evaluation is read)."),
    out: Path = typer.Option(Path("models/registered.json"), help="JSON naming the new model version."),
) -> None:
    """Register the EMA model as a new MLflow model version (pyfunc), tagged with its evaluation."""
    from components import register as stage

    result = stage.run(params, model, run_file, out)
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
    params: Path = PARAMS,
    registered: Path = typer.Option(Path("models/registered.json"), help="Written by `tim register`."),
    version: str = typer.Option(None, help="Judge this version instead of the one in --registered."),
    out: Path = typer.Option(Path("runs/promote/decision.json"), help="The decision as JSON."),
) -> None:
    """Champion/challenger gate: the version becomes `champion` only if it passes and beats the champion."""
    from components import promote as stage

    d = stage.run_promote(params, registered, version, out)
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
    params: Path = PARAMS,
    out: Path = typer.Option(Path("runs/promote/rollback.json"), help="The rollback record as JSON."),
) -> None:
    """Give `champion` back to the `previous` version."""
    from components import promote as stage

    d = stage.run_rollback(params, out)
    print(f"{d['model']}: champion rolled back from version {d['from']} to {d['to']}; aliases: {d['aliases']}")


@app.command()
def sample(
    params: Path = PARAMS,
    model: str = typer.Option(..., help="A registered model URI, e.g. models:/tim-mnist@champion."),
    label: int = typer.Option(..., help="Class to draw."),
    nfe: int = typer.Option(None, help="Transitions per image; default: the version's recommended NFE."),
    num_images: int = typer.Option(8, help="Images in the row."),
    guidance_scale: float = typer.Option(None, help="Classifier-free guidance; default: the evaluation's."),
    seed: int = typer.Option(0, help="Noise seed."),
    out: Path = typer.Option(Path("grid.png"), help="Output PNG (one row of images)."),
) -> None:
    """Draw images of one class from a registered model (the pyfunc that `mlflow models serve` serves)."""
    from components.params import load_section
    from components.registry import RegistryParams
    from components.sample_registered import sample as draw

    registry = load_section("registry", RegistryParams, params)
    result = draw(registry, model, label, nfe, num_images, guidance_scale, seed, out,
                  project_dir=params.resolve().parent)
    print(f"recommended NFE: {result.recommended_nfe}")
    print(f"{num_images} images of class {label} at NFE {result.nfe}: {result.path}")


if __name__ == "__main__":
    app()
