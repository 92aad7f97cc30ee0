"""Stage `evaluate`: sample quality of one trained model at every step count, in the evaluator's feature space.

  tim evaluate --model models/tim --evaluator models/evaluator --shards data/shards \
      --out runs/evaluate --run-file models/train_run.json [--profile ..] [--set ..]

``--model`` is an exported folder or an MLflow URI (``runs:/<id>/model``, ``models:/<name>@<alias>``).
For each step count: a class-balanced set of samples (the same noise at every step count, so the columns
differ only by the sampler), FID / KID / precision / recall against the train split, the evaluator's accuracy
on the requested classes, seconds per image and the honest NFE. Two noise seeds give the metric's own noise,
against which "FID does not get worse as NFE doubles" is judged. The floor is the same metrics between the
validation and train splits. Where the training checkpoint is at hand, the raw (non-EMA) weights are evaluated
too, so that a bad EMA is caught before it is promoted.

Outputs (one folder, written atomically): metrics.json, per_nfe.csv, fid_vs_nfe.png, samples.png; all logged to
the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor
from tqdm import tqdm

import tim_core
from components.common.errors import ModelError
from components.common.files import atomic_dir
from components.common.layout import RAW_DIR
from components.common.params import StageParams
from components.common.tracking import MlflowParams, Tracking
from components.data.reader import load_split
from components.evaluation import metrics
from components.evaluation.feature_net import Evaluator, batched, load_evaluator

log = logging.getLogger(__name__)

URI_SCHEMES = ("runs:/", "models:/")


class EvaluateParams(StageParams):
    seed: int = 0
    # Transitions per sample; with guidance the honest NFE (what the CSV, plot and verdict use) is twice this.
    steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    # Samples per class in each set. The floor takes as many validation images per class, so that it is measured
    # at the same set size (FID is biased by the set size). 20 x 10 digits x 255 steps fits a CPU in minutes.
    samples_per_class: int = Field(20, ge=2)
    classes: list[int] | None = None     # the requested classes; null = every class of the model
    noise_seeds: int = Field(2, ge=1)    # sample sets per step count; >= 2 estimates the metrics' own noise
    batch_size: int = Field(250, ge=1)
    # Classifier-free guidance scales, each measured at every step count. The first is the base (its figures are
    # metrics.json's "ema"); 1 = unguided. A guided step costs 2 network calls: the honest NFE doubles.
    cfg_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5])
    # auto: 'diffusion' (F(x, t, t)) for a flow-matching model, whose network never saw r != t; else 'transition'.
    mode: Literal["auto", "transition", "diffusion"] = "auto"
    kid_subset_size: int = Field(200, ge=2)
    kid_subsets: int = Field(20, ge=1)
    pr_k: int = Field(3, ge=1)
    raw_weights: bool = True             # also evaluate the raw weights when the export has them (raw/)
    grid_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 32])
    grid_per_class: int = Field(8, ge=1)
    threads: int = Field(0, ge=0)        # torch CPU threads; 0 = torch's default

    @field_validator("cfg_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct guidance scales >= 0 (1 = unguided)")
        return v

    @field_validator("steps", "grid_steps")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError("must be a non-empty list of step counts >= 1")
        return sorted(set(v))


# --- model sources --------------------------------------------------------------------------------------------
@contextmanager
def model_folder(source: str, tracking_uri: str) -> Iterator[tuple[Path, str | None]]:
    """(a local folder for ``source``, the MLflow run it came from): the folder itself, or the artifact a
    ``runs:/`` or ``models:/name@alias`` (``models:/name/version``) URI names, downloaded into a temp folder."""
    if not source.startswith(URI_SCHEMES):
        yield Path(source), None
        return
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="tim-eval-model-") as tmp:
        try:
            if source.startswith("runs:/"):
                artifact_uri, run_id = source, source.split("/")[1]
            else:
                # The registry is asked explicitly: download_artifacts alone would look in the default registry.
                client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                ref = source.removeprefix("models:/").strip("/")
                if "@" in ref:
                    version = client.get_model_version_by_alias(*ref.split("@", 1))
                elif "/" in ref:
                    version = client.get_model_version(*ref.rsplit("/", 1))
                else:
                    raise ModelError(f"{source}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
                artifact_uri = client.get_model_version_download_uri(version.name, version.version)
                run_id = version.run_id
            path = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp,
                                                       tracking_uri=tracking_uri)
        except (MlflowException, OSError) as e:
            raise ModelError(f"{source}: cannot download from MLflow at {tracking_uri}: {e}") from None
        yield Path(path), run_id


def load_model(folder: Path) -> tuple[tim_core.TiM, tim_core.Transport, dict, tim_core.LatentSpace | None]:
    """The network, its path, its config and the VAE it decodes with (None for a pixel model)."""
    try:
        model, transport = tim_core.load_pretrained(folder)
        latent = tim_core.load_latent_space(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelError(f"{folder}: {e}") from None
    return model, transport, json.loads((folder / "config.json").read_text()), latent


def objective_of(config: dict, tracking_uri: str, run_id: str | None) -> str | None:
    """The training objective: from the export's lineage, else the run's params."""
    objective = config.get("train", {}).get("objective")
    if objective or not run_id:
        return objective
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.params.get("objective.name")
    except MlflowException:
        return None


# --- measuring ------------------------------------------------------------------------------------------------
class FeatureSpace:
    """The evaluator's features and logits, and every metric against one reference set."""

    def __init__(self, evaluator: Evaluator, reference: Tensor, params: EvaluateParams) -> None:
        self.evaluator, self.params = evaluator, params
        self.reference = self.features(reference)[0]
        self.reference_stats = metrics.feature_stats(self.reference)

    def features(self, images: Tensor) -> tuple[np.ndarray, Tensor]:
        feats = batched(self.evaluator.features, images.clamp(-1, 1))
        return feats.double().numpy(), self.evaluator.head(feats)

    def measure(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        p = self.params
        feats, logits = self.features(images)
        kid, kid_std = metrics.kid(self.reference, feats, p.kid_subset_size, p.kid_subsets, seed=p.seed)
        precision, recall = metrics.precision_recall(self.reference, feats, k=p.pr_k)
        return {"fid": metrics.fid_from_stats(*self.reference_stats, *metrics.feature_stats(feats)),
                "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall,
                "accuracy": float((logits.argmax(1) == labels).double().mean())}


def scale_key(scale: float) -> str:
    """How a guidance scale names its figures in metrics.json and MLflow: 1.5 -> "1.5", 1.0 -> "1"."""
    return f"{scale:g}"


def generate(model: tim_core.TiM, transport: tim_core.Transport, labels: Tensor, noise: Tensor, steps: int,
             cfg_scale: float, p: EvaluateParams, mode: str, desc: str,
             latent: tim_core.LatentSpace | None = None) -> tuple[Tensor, int, float]:
    """Images for ``labels`` from ``noise`` in batches (decoded by ``latent`` for a latent model): (images,
    honest NFE per sample, seconds per image, decoding included)."""
    out, nfe, started = [], 0, time.perf_counter()
    for i in tqdm(range(0, len(labels), p.batch_size), desc=desc, leave=False):
        result = tim_core.sample(model, noise[i:i + p.batch_size], labels[i:i + p.batch_size], steps,
                                 transport=transport, cfg_scale=cfg_scale, mode=mode)
        out.append(latent.decode(result.samples) if latent is not None else result.samples)
        nfe = result.nfe
    return torch.cat(out), nfe, (time.perf_counter() - started) / len(labels)


def monotonicity(rows: list[dict]) -> dict[str, Any]:
    """Does FID stay within its own noise as NFE grows? The noise is the spread between noise seeds: each
    pair of seeds at one NFE gives a variance estimate (a - b)^2 / 2; pooled, its root is one seed's
    standard deviation. The difference of two NFEs' means then has sd sigma * sqrt(2 / seeds), and an increase
    beyond two of those counts as getting worse."""
    by_nfe: dict[int, list[float]] = {}
    for r in rows:
        by_nfe.setdefault(r["nfe"], []).append(r["fid"])
    nfes = sorted(by_nfe)
    seeds = min(len(v) for v in by_nfe.values())
    if seeds < 2:
        return {"verdict": None, "reason": "one noise seed: the metric's noise is unknown"}
    variances = [np.var(v, ddof=1) for v in by_nfe.values()]
    sigma = float(np.sqrt(np.mean(variances)))
    tolerance = 2 * sigma * np.sqrt(2 / seeds)
    means = {n: float(np.mean(by_nfe[n])) for n in nfes}
    increases = {f"{a}->{b}": means[b] - means[a] for a, b in zip(nfes, nfes[1:])}
    worst = max(increases, key=increases.get) if increases else None
    return {"verdict": all(v <= tolerance for v in increases.values()), "fid_noise_sd": sigma,
            "tolerance": float(tolerance), "worst_step": worst,
            "worst_increase": increases[worst] if worst else 0.0, "fid_mean": {str(n): means[n] for n in nfes}}


def plot_fid(curves: dict[str, list[tuple[int, float, float]]], floor: float | None, path: Path,
             title: str) -> None:
    """FID against NFE on a log x axis; one line per curve (points: nfe, mean, spread between seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        nfe, mean, spread = map(np.asarray, zip(*points))
        ax.errorbar(nfe, mean, yerr=spread / 2, marker="o", capsize=3, label=name)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label="floor (val vs train)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_yscale("log")  # FID spans orders of magnitude between 1 step of a weak model and the floor
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID (evaluator features)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fid_curve(rows: list[dict]) -> list[tuple[int, float, float]]:
    by_nfe: dict[int, list[float]] = {}
    for r in rows:
        by_nfe.setdefault(r["nfe"], []).append(r["fid"])
    return [(n, float(np.mean(v)), float(np.ptp(v))) for n, v in sorted(by_nfe.items())]


# --- the stage ------------------------------------------------------------------------------------------------
def evaluate_model(model: tim_core.TiM, transport: tim_core.Transport, space: FeatureSpace, p: EvaluateParams,
                   mode: str, weights: str, seeds: list[int], scales: list[float],
                   latent: tim_core.LatentSpace | None = None) -> list[dict]:
    classes = p.classes if p.classes is not None else list(range(model.num_classes))
    labels = torch.tensor(classes).repeat_interleave(p.samples_per_class)
    shape = (len(labels), model.in_channels, *model.input_size)
    rows = []
    for seed in seeds:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for scale in scales:
            for steps in p.steps:
                images, nfe, spi = generate(model, transport, labels, noise, steps, scale, p, mode,
                                            desc=f"{weights} seed {seed} guidance {scale:g} {steps} steps",
                                            latent=latent)
                rows.append({"weights": weights, "cfg_scale": scale, "seed": seed, "steps": steps, "nfe": nfe,
                             **space.measure(images, labels), "sec_per_image": spi})
                log.info("%s seed %d guidance %g: %d steps (NFE %d) FID %.2f acc %.3f", weights, seed, scale, steps,
                         nfe, rows[-1]["fid"], rows[-1]["accuracy"])
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per NFE: each metric averaged over the noise seeds."""
    import pandas as pd

    keys = ["fid", "kid", "precision", "recall", "accuracy", "sec_per_image"]
    table = pd.DataFrame(rows).groupby("nfe")[keys].mean()
    return {f"nfe_{n}": {k: float(v) for k, v in row.items()} for n, row in table.iterrows()}


def evaluate(params: EvaluateParams, model_source: str, evaluator_dir: str | Path, shard_dir: str | Path,
             out_dir: str | Path, run_file: str | Path | None = None, *, tracking: Tracking | None = None,
             log_to_mlflow: bool = True) -> dict[str, Any]:
    """Run the evaluation and write ``out_dir``; returns the content of metrics.json. ``tracking``: the MLflow
    store (default: the rule of components.common.tracking with no params entry, in the working folder)."""
    import pandas as pd

    from components.evaluation.grid import nfe_grid

    tracking = tracking or Tracking.resolve(MlflowParams(), Path.cwd())
    if params.threads:
        torch.set_num_threads(params.threads)
    run = json.loads(Path(run_file).read_text()) if run_file and Path(run_file).is_file() else None
    if run:
        tracking.same_store(run.get("tracking_uri"), f"the training run in {run_file}")
    tracking_uri = tracking.uri

    evaluator, evaluator_config = load_evaluator(evaluator_dir)
    train_x, _ = load_split(shard_dir, "train")
    val_x, val_y = load_split(shard_dir, "val")
    space = FeatureSpace(evaluator, train_x, params)
    keep = balanced(val_y, params.classes, params.samples_per_class)
    floor = space.measure(val_x[keep], val_y[keep])
    log.info("floor (val vs train): FID %.2f, accuracy %.3f", floor["fid"], floor["accuracy"])

    with model_folder(model_source, tracking_uri) as (folder, uri_run_id):
        model, transport, config, latent = load_model(folder)
        # The train stage exports the raw (non-EMA) weights beside the EMA ones, in raw/ (with the same VAE).
        has_raw = params.raw_weights and (folder / RAW_DIR / "config.json").is_file()
        raw = load_model(folder / RAW_DIR)[0] if has_raw else None
    image_shape = (latent.image_channels, *(s * latent.factor for s in model.input_size)) if latent else (
        model.in_channels, *model.input_size)
    if image_shape != tuple(val_x.shape[1:]):
        raise ModelError(f"{model_source}: makes images of shape {image_shape}"
                         f"{' (decoded by its VAE)' if latent else ''}, the images in {shard_dir} are "
                         f"{tuple(val_x.shape[1:])}: evaluate on the shards the model's data was made from")
    if params.classes is not None and not all(0 <= c < model.num_classes for c in params.classes):
        raise ModelError(f"evaluate.classes {params.classes} outside the model's 0..{model.num_classes - 1}")
    if evaluator.config["num_classes"] != model.num_classes:
        raise ModelError(f"the evaluator knows {evaluator.config['num_classes']} classes, the model "
                         f"{model.num_classes}: train both on the same shards")
    run_id = (run or {}).get("run_id") or uri_run_id or config.get("train", {}).get("mlflow_run_id")
    objective = objective_of(config, tracking_uri, run_id)
    mode = params.mode if params.mode != "auto" else ("diffusion" if objective == "fm" else "transition")
    if params.mode == "auto" and objective is None:
        log.warning("the model does not record its training objective; sampling in transition mode")

    seeds, base = [params.seed + i for i in range(params.noise_seeds)], params.cfg_scales[0]
    rows = evaluate_model(model, transport, space, params, mode, "ema", seeds, params.cfg_scales, latent)
    if raw is not None:  # the EMA-vs-raw check needs one seed at the base scale
        rows += evaluate_model(raw, transport, space, params, mode, "raw", seeds[:1], [base], latent)

    def ema_at(scale: float) -> list[dict]:
        return [r for r in rows if r["weights"] == "ema" and r["cfg_scale"] == scale]

    scales = {scale_key(s): {"ema": summary(ema_at(s)), "monotone": monotonicity(ema_at(s))}
              for s in params.cfg_scales}
    result: dict[str, Any] = {
        "objective": objective, "mode": mode, "cfg_scale": base, "cfg_scales": params.cfg_scales,
        "samples_per_set": params.samples_per_class * len(params.classes or range(model.num_classes)),
        "evaluator_val_accuracy": evaluator_config["val_accuracy"], "floor_set_size": len(keep), "floor": floor,
        **scales[scale_key(base)], "scales": scales,
    }
    if raw is not None:
        result["raw"] = summary([r for r in rows if r["weights"] == "raw"])
    curves = {f"EMA, guidance {s:g} ({len(seeds)} seeds)": fid_curve(ema_at(s)) for s in params.cfg_scales}
    if raw is not None:
        curves[f"raw weights, guidance {base:g}"] = fid_curve([r for r in rows if r["weights"] == "raw"])

    grid = nfe_grid(model, transport, params.grid_steps, per_class=params.grid_per_class,
                    cfg_scale=base, seed=params.seed, mode=mode, latent=latent)
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        pd.DataFrame(rows).to_csv(tmp / "per_nfe.csv", index=False)
        plot_fid(curves, floor["fid"], tmp / "fid_vs_nfe.png", f"{objective or 'model'} ({mode} sampling)")
        grid.save(tmp / "samples.png", format="PNG")
    if log_to_mlflow and run_id:
        log_to_run(tracking_uri, run_id, result, Path(out_dir))
    elif log_to_mlflow:
        log.warning("no MLflow run known for %s (no run file, runs:/ URI or lineage): not logged", model_source)
    return result


def balanced(labels: Tensor, classes: list[int] | None, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` items of each requested class (all of a class that has fewer)."""
    wanted = classes if classes is not None else labels.unique().tolist()
    return torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in wanted])


def log_to_run(tracking_uri: str, run_id: str, result: dict, out_dir: Path) -> None:
    """Metrics on the training run: eval/<weights>/<metric> (base guidance scale) and eval/cfg<scale>/ema/<metric>
    (the others) with the honest NFE as the step (MLflow draws FID against NFE), the floor and verdicts as single
    values, and the whole output folder as artifacts."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    base = scale_key(result["cfg_scale"])
    items = [Metric(f"eval/floor/{k}", v, stamp, 0) for k, v in result["floor"].items()]
    figures = {"eval/ema": result["ema"], "eval/raw": result.get("raw", {}),
               **{f"eval/cfg{key}/ema": s["ema"] for key, s in result["scales"].items() if key != base}}
    for prefix, per_nfe in figures.items():
        for nfe_key, values in per_nfe.items():
            nfe = int(nfe_key.removeprefix("nfe_"))
            items += [Metric(f"{prefix}/{k}", v, stamp, nfe) for k, v in values.items()]
    for key, s in result["scales"].items():
        if s["monotone"]["verdict"] is not None:
            name = "eval/monotone" if key == base else f"eval/cfg{key}/monotone"
            items.append(Metric(name, float(s["monotone"]["verdict"]), stamp, 0))
    client = MlflowClient(tracking_uri=tracking_uri)
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start:start + 1000])
    client.log_artifacts(run_id, str(out_dir), artifact_path="evaluation")

