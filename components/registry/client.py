"""What the registry stages share: the ``registry`` params section, lookups in the MLflow model registry (the
store of params.yaml's ``mlflow`` section, components.common.tracking), and the evaluation figures a model version
is judged by (its training run's evaluation/metrics.json, as written and logged by `tim evaluate`)."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from components.common.errors import RegistryError
from components.common.params import StageParams

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
RUN_TAG = "tim.train.run_id"             # the training run whose evaluation judges a version
RECOMMENDED_TAG = "tim.recommended_nfe"
METRICS_ARTIFACT = "evaluation/metrics.json"
# Which way is better for each figure evaluate.py reports per NFE.
LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False, "accuracy": False}
Metric = Literal["fid", "kid", "precision", "recall", "accuracy"]


class RecommendParams(StageParams):
    metric: Metric = "fid"
    # The evaluation's guidance scale whose figures choose the NFE; the served model defaults to this scale.
    guidance_scale: float = Field(1.0, ge=0)
    tolerance: float = Field(0.10, ge=0)  # relative to the best NFE's figure: 0.10 = within 10%


class GateParams(StageParams):
    metric: Metric = "fid"
    guidance_scale: float = Field(1.0, ge=0)  # judge the evaluation's figures at this guidance scale
    nfe: list[int] = Field(default_factory=lambda: [1, 4])  # the challenger must win at every one of these
    min_improvement: float = Field(0.0, ge=0)      # absolute margin over the champion's figure
    min_rel_improvement: float = Field(0.02, ge=0)  # and this fraction of the champion's figure
    require_monotone: bool = True
    max: dict[Metric, float] = Field(default_factory=dict)  # absolute ceilings at every gate NFE
    min: dict[Metric, float] = Field(default_factory=lambda: {"accuracy": 0.5})  # absolute floors, likewise

    @field_validator("nfe")
    @classmethod
    def _nfe(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("must be a non-empty list of NFEs >= 1")
        return sorted(set(v))


class LockParams(StageParams):
    lease_s: float = Field(600, gt=0)   # a crashed promotion blocks others at most this long
    settle_s: float = Field(1.0, ge=0)  # wait between writing the lease and checking it is still ours
    wait_s: float = Field(120, ge=0)    # how long to queue behind another promotion


class RegistryParams(StageParams):
    model_name: str = "tim-mnist"
    max_images_per_request: int = Field(256, ge=1)
    max_nfe: int = Field(1024, ge=1)  # transitions per image a request may ask for: bounds one request's work
    recommend: RecommendParams = RecommendParams()
    gate: GateParams = GateParams()
    lock: LockParams = LockParams()


def registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"registered model {name!r} not found at {client.tracking_uri}: run `tim register` "
                            f"first or check registry.model_name ({e.error_code})") from None


def model_version(client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}") from None


def aliases(model) -> dict[str, str]:
    """A registered model's aliases as alias -> version string (the SQL store hands out ints, the server strings)."""
    return {alias: str(version) for alias, version in model.aliases.items()}


@dataclass(frozen=True)
class Evaluation:
    """A version's figures: ``per_nfe[nfe][metric]`` averaged over noise seeds, and the monotonicity verdict."""

    run_id: str
    per_nfe: dict[int, dict[str, float]]
    monotone: bool | None
    cfg_scale: float

    @classmethod
    def from_metrics(cls, run_id: str, metrics: dict[str, Any], scale: float = 1.0) -> Evaluation:
        """The figures at guidance ``scale`` (metrics.json's "scales", keyed like evaluate.scale_key)."""
        try:
            scales = metrics["scales"]
            if f"{scale:g}" not in scales:
                raise RegistryError(f"run {run_id}: {METRICS_ARTIFACT} has no figures at guidance scale {scale:g} "
                                    f"(measured: {', '.join(scales)}); add it to evaluate.cfg_scales and evaluate "
                                    "again, or change registry.gate/recommend.guidance_scale")
            figures = scales[f"{scale:g}"]
            per_nfe = {int(k.removeprefix("nfe_")): {m: float(v) for m, v in values.items()}
                       for k, values in figures["ema"].items()}
            return cls(run_id, per_nfe, figures["monotone"]["verdict"], float(scale))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RegistryError(f"run {run_id}: {METRICS_ARTIFACT} is not in the format `tim evaluate` writes "
                                f"({type(e).__name__}: {e})") from None

    def figure(self, nfe: int, metric: str) -> float | None:
        """The figure, or None when it was not measured or is not a finite number (a failed measurement)."""
        value = self.per_nfe.get(nfe, {}).get(metric)
        return value if value is not None and math.isfinite(value) else None

    def tags(self) -> dict[str, str]:
        """Per-NFE figures and the verdict as model-version tags (readable in the UI, searchable)."""
        tags = {f"tim.eval.nfe_{n}.{m}": f"{v:.6g}" for n, values in sorted(self.per_nfe.items())
                for m, v in values.items()}
        return {**tags, "tim.eval.monotone": str(self.monotone).lower(), "tim.eval.cfg_scale": str(self.cfg_scale)}


def evaluation(client, run_id: str, scale: float = 1.0) -> Evaluation:
    """The evaluation `tim evaluate` logged to a training run, at guidance ``scale``; RegistryError when there is
    none."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="tim-eval-") as tmp:
        try:
            path = client.download_artifacts(run_id, METRICS_ARTIFACT, tmp)
            metrics = json.loads(Path(path).read_text())
        except (MlflowException, OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"run {run_id} has no readable {METRICS_ARTIFACT} ({type(e).__name__}): run "
                                "`tim evaluate --run-file models/train_run.json` on its model first") from None
    return Evaluation.from_metrics(run_id, metrics, scale)


def version_evaluation(client, version, scale: float = 1.0) -> Evaluation:
    run_id = version.tags.get(RUN_TAG) or version.run_id
    if not run_id:
        raise RegistryError(f"version {version.version} of {version.name!r} names no training run "
                            f"(tag {RUN_TAG}); register it with `tim register`")
    return evaluation(client, run_id, scale)


def recommended_nfe(ev: Evaluation, p: RecommendParams) -> int | None:
    """The smallest NFE whose figure is within ``tolerance`` (relative) of the best NFE's; None if none is
    finite."""
    figures = {n: ev.figure(n, p.metric) for n in sorted(ev.per_nfe)}
    figures = {n: v for n, v in figures.items() if v is not None}
    if not figures:
        return None
    if LOWER_IS_BETTER[p.metric]:
        best = min(figures.values())
        return min(n for n, v in figures.items() if v <= best + p.tolerance * abs(best))
    best = max(figures.values())
    return min(n for n, v in figures.items() if v >= best - p.tolerance * abs(best))

