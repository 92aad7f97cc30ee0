"""`tim compare`: flow matching, MeanFlow and TiM side by side, with the same network, data, seed and budget.

  tim compare --shards data/shards --evaluator models/evaluator --out runs/compare [--profile ..] [--set ..]

Each objective is trained through the train stage's own function (its own export and Ray storage folder, its
own MLflow run), then evaluated by the evaluate stage at the same step counts (flow matching in 'diffusion'
mode, read from the export's recorded objective). The summary is a markdown table and one plot of the FID
curves: <out>/summary/table.md and <out>/summary/fid_vs_nfe.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.common.files import atomic_dir
from components.common.params import ParamsSource, StageParams, deep_merge, validate
from components.common.tracking import Tracking
from components.evaluation.evaluate import EvaluateParams, evaluate, fid_curve, plot_fid
from components.train.settings import TrainParams

log = logging.getLogger(__name__)

NAMES = {"fm": "flow matching", "meanflow": "MeanFlow", "tim": "TiM"}


class CompareParams(StageParams):
    objectives: list[Literal["fm", "meanflow", "tim"]] = Field(default_factory=lambda: ["fm", "meanflow", "tim"])
    train_profile: str | None = None     # profile of the train section to start from; null = its own
    evaluate_profile: str | None = None  # likewise for the evaluate section
    train: dict[str, Any] = Field(default_factory=dict)     # overrides for all runs (e.g. a reduced budget)
    evaluate: dict[str, Any] = Field(default_factory=dict)  # overrides of the evaluation


def _section(source: ParamsSource, stage: str, profile: str | None, overrides: dict) -> dict:
    """Section ``stage`` as the command resolves it, with compare's choice of its profile (the command's own
    ``--set {stage}.profile=..`` still wins) and compare's overrides on top."""
    chosen = (f"{stage}.profile={profile}",) if profile is not None else ()
    resolved = ParamsSource(source.path, source.profile, chosen + source.sets).section(stage)
    return deep_merge(resolved, overrides)


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per NFE, FID (mean over seeds) and evaluator accuracy per objective, and the floor."""
    objectives = list(results)
    nfes = sorted({int(k.removeprefix("nfe_")) for r in results.values() for k in r["ema"]})
    head = "| NFE | " + " | ".join(f"{NAMES[o]} FID | {NAMES[o]} acc" for o in objectives) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(objectives))]
    for n in nfes:
        cells = []
        for o in objectives:
            m = results[o]["ema"].get(f"nfe_{n}")
            cells += [f"{m['fid']:.2f}", f"{m['accuracy']:.3f}"] if m else ["", ""]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    floor = next(iter(results.values()))["floor"]
    lines.append(f"\nFloor (validation vs train split, same set size): FID {floor['fid']:.2f}, "
                 f"accuracy {floor['accuracy']:.3f}.")
    for o in objectives:
        mono = results[o]["monotone"]
        if mono.get("verdict") is not None:
            lines.append(f"{NAMES[o]} ({results[o]['mode']} sampling): FID within noise as NFE grows: "
                         f"{mono['verdict']} (worst {mono['worst_step']}: {mono['worst_increase']:+.2f}, "
                         f"tolerance {mono['tolerance']:.2f}).")
    return "\n".join(lines) + "\n"


def compare(params: CompareParams, source: ParamsSource, shard_dir: str | Path, evaluator_dir: str | Path,
            out_dir: str | Path, *, tracking: Tracking) -> str:
    """Train and evaluate every objective alike; writes ``out_dir`` and returns the markdown table."""
    import pandas as pd

    from components.train.stage import train

    out_dir, where = Path(out_dir), f"{source.path}: compare"
    train_base = _section(source, "train", params.train_profile, params.train)
    eval_params = validate(EvaluateParams, _section(source, "evaluate", params.evaluate_profile, params.evaluate),
                           f"{where} (evaluate)")
    results, rows = {}, {}
    for objective in params.objectives:
        folder = out_dir / objective
        train_params = validate(TrainParams, deep_merge(train_base, {
            "objective": {"name": objective},
            "distributed": {"storage_path": str((folder / "ray").resolve())}}), f"{where} (train, {objective})")
        log.info("compare: training %s", objective)
        train(train_params, shard_dir, folder / "model", folder / "train_run.json", tracking=tracking,
              project_dir=source.project_dir)
        log.info("compare: evaluating %s", objective)
        results[objective] = evaluate(eval_params, str(folder / "model"), evaluator_dir, shard_dir,
                                      folder / "evaluation", folder / "train_run.json", tracking=tracking)
        frame = pd.read_csv(folder / "evaluation" / "per_nfe.csv")
        rows[objective] = frame[frame.weights == "ema"].to_dict("records")

    text = table(results)
    with atomic_dir(out_dir / "summary") as tmp:
        (tmp / "table.md").write_text(text)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        plot_fid({NAMES[o]: fid_curve(r) for o, r in rows.items()}, next(iter(results.values()))["floor"]["fid"],
                 tmp / "fid_vs_nfe.png", "Same network, data and budget")
    return text

