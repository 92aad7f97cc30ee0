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
    run_file: Path = typer.Option(None, help="models/train_run.json: the MLflow run to log to, and the "
                                              "checkpoint with the raw weights."),
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


if __name__ == "__main__":
    app()
