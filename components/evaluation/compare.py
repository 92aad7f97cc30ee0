"""`tim compare`: flow matching, MeanFlow and TiM side by side, with the same network, data, seed and budget.

  tim compare --data data/encoded --shards data/shards --evaluator models/evaluator --out runs/compare [..]

Each run (flow matching with each of its time samplings, MeanFlow, TiM) is trained through the train stage's own
function (its own export and Ray storage folder, its own MLflow run), then evaluated by the evaluate stage at the
same step counts and guidance scales (flow matching in 'diffusion' mode, read from the export's recorded
objective). The summary names the strongest flow-matching variant and compares TiM with it; it is a markdown table
and one plot of the FID curves: <out>/summary/table.md and <out>/summary/fid_vs_nfe.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from components.common.files import atomic_dir
from components.common.params import ParamsSource, StageParams, deep_merge, validate
from components.common.tracking import Tracking
from components.evaluation.evaluate import EvaluateParams, evaluate, fid_curve, plot_fid
from components.train.settings import TrainParams

log = logging.getLogger(__name__)

# Each compared run: (objective, its params, name). Flow matching runs with each documented time sampling, so that
# TiM is measured against the strongest faithful variant on the budget, not against a weakened one.
RUNS = {
    "fm-uniform": ("fm", {"time_sampling": "uniform"}, "FM, uniform t (SiT)"),
    "fm-logit-normal": ("fm", {"time_sampling": "logit_normal"}, "FM, logit-normal t"),
    "fm-max-of-two": ("fm", {"time_sampling": "max_of_two"}, "FM, max of two draws"),
    "meanflow": ("meanflow", {}, "MeanFlow"),
    "tim": ("tim", {}, "TiM"),
}
Run = Literal[tuple(RUNS)]


class CompareParams(StageParams):
    objectives: list[Run] = Field(default_factory=lambda: list(RUNS))
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


def strongest_fm(results: dict[str, dict]) -> str | None:
    """The flow-matching run with the lowest geometric-mean FID over the unguided NFEs (FID spans orders of
    magnitude between 1 and 128 steps: an arithmetic mean would be the 1-step figure alone)."""
    fm = [name for name in results if RUNS[name][0] == "fm"]
    return min(fm, key=lambda name: np.mean([np.log(m["fid"]) for m in results[name]["ema"].values()]),
               default=None)


def table(results: dict[str, dict]) -> str:
    """Markdown: per guidance scale, one row per honest NFE with each run's FID (mean over seeds) and evaluator
    accuracy; then the floor, each run's seed noise and verdict, and TiM against the strongest flow matching."""
    runs = list(results)
    lines = []
    for scale in next(iter(results.values()))["scales"]:
        per_run = {name: results[name]["scales"][scale] for name in runs}
        nfes = sorted({int(k.removeprefix("nfe_")) for r in per_run.values() for k in r["ema"]})
        lines += [f"Guidance scale {scale}{' (unguided)' if scale == '1' else ''}:", "",
                  "| NFE | " + " | ".join(f"{RUNS[n][2]} FID | acc" for n in runs) + " |",
                  "|" + "---|" * (1 + 2 * len(runs))]
        for nfe in nfes:
            cells = []
            for name in runs:
                m = per_run[name]["ema"].get(f"nfe_{nfe}")
                cells += [f"{m['fid']:.2f}", f"{m['accuracy']:.3f}"] if m else ["", ""]
            lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
        for name in runs:
            mono = per_run[name]["monotone"]
            if mono.get("verdict") is not None:
                lines.append(f"\n{RUNS[name][2]} ({results[name]['mode']} sampling): FID seed-to-seed sd "
                             f"{mono['fid_noise_sd']:.2f}; within noise as NFE grows: {mono['verdict']} (worst "
                             f"{mono['worst_step']}: {mono['worst_increase']:+.2f}, "
                             f"tolerance {mono['tolerance']:.2f}).")
        lines.append("")
    floor = next(iter(results.values()))["floor"]
    lines.append(f"Floor (validation vs train split, same set size): FID {floor['fid']:.2f}, "
                 f"accuracy {floor['accuracy']:.3f}.")
    best = strongest_fm(results)
    if best and "tim" in results:
        tim, fm = results["tim"]["ema"], results[best]["ema"]
        shared = sorted(set(tim) & set(fm), key=lambda k: int(k.removeprefix("nfe_")))
        below = [k.removeprefix("nfe_") for k in shared if tim[k]["fid"] < fm[k]["fid"]]
        lines.append(f"Strongest flow matching on this budget (unguided, geometric-mean FID): {RUNS[best][2]}. "
                     f"TiM's FID is below it at {len(below)} of {len(shared)} NFEs ({', '.join(below) or 'none'}).")
    return "\n".join(lines) + "\n"


def compare(params: CompareParams, source: ParamsSource, shard_dir: str | Path, evaluator_dir: str | Path,
            out_dir: str | Path, *, tracking: Tracking, data_dir: str | Path | None = None) -> str:
    """Train (on ``data_dir``, `tim encode`'s output; default the image shards) and evaluate (on the image
    shards) every objective alike; writes ``out_dir`` and returns the markdown table."""
    import pandas as pd

    from components.train.stage import train

    out_dir, where = Path(out_dir), f"{source.path}: compare"
    train_base = _section(source, "train", params.train_profile, params.train)
    eval_params = validate(EvaluateParams, _section(source, "evaluate", params.evaluate_profile, params.evaluate),
                           f"{where} (evaluate)")
    results, rows = {}, {}
    for name in params.objectives:
        objective, objective_params, _ = RUNS[name]
        folder = out_dir / name
        train_params = validate(TrainParams, deep_merge(train_base, {
            "objective": {"name": objective, "params": objective_params},
            "distributed": {"storage_path": str((folder / "ray").resolve())}}), f"{where} (train, {name})")
        log.info("compare: training %s", name)
        train(train_params, data_dir or shard_dir, folder / "model", folder / "train_run.json", tracking=tracking,
              project_dir=source.project_dir)
        log.info("compare: evaluating %s", name)
        results[name] = evaluate(eval_params, str(folder / "model"), evaluator_dir, shard_dir,
                                 folder / "evaluation", folder / "train_run.json", tracking=tracking)
        frame = pd.read_csv(folder / "evaluation" / "per_nfe.csv")
        rows[name] = frame[frame.weights == "ema"].to_dict("records")

    text = table(results)
    with atomic_dir(out_dir / "summary") as tmp:
        (tmp / "table.md").write_text(text)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        curves = {f"{RUNS[name][2]}, guidance {scale:g}": fid_curve([r for r in run if r["cfg_scale"] == scale])
                  for name, run in rows.items() for scale in sorted({r["cfg_scale"] for r in run})}
        plot_fid(curves, next(iter(results.values()))["floor"]["fid"], tmp / "fid_vs_nfe.png",
                 "Same network, data and budget")
    return text

