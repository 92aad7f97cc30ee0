"""`tim compare`: flow matching, MeanFlow and TiM side by side, with the same network, data, seed and budget.

  tim compare --params params.yaml --shards data/shards --evaluator models/evaluator --out runs/compare

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

from components.atomic import atomic_dir
from components.evaluate import EvaluateParams, evaluate, fid_curve, plot_fid
from components.params import StageParams, deep_merge, load_section, read_params, resolve_profile
from components.train_params import TrainParams

log = logging.getLogger(__name__)

NAMES = {"fm": "flow matching", "meanflow": "MeanFlow", "tim": "TiM"}


class CompareParams(StageParams):
    objectives: list[Literal["fm", "meanflow", "tim"]] = Field(default_factory=lambda: ["fm", "meanflow", "tim"])
    train_profile: str | None = None     # profile of the train section to start from; null = its own
    evaluate_profile: str | None = None  # likewise for the evaluate section
    train: dict[str, Any] = Field(default_factory=dict)     # overrides for all runs (e.g. a reduced budget)
    evaluate: dict[str, Any] = Field(default_factory=dict)  # overrides of the evaluation


def _section(data: dict, stage: str, profile: str | None, overrides: dict, where: str) -> dict:
    section = dict(data.get(stage) or {})
    if profile is not None:
        section["profile"] = profile
    return deep_merge(resolve_profile(section, f"{where}: {stage}"), overrides)


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


def compare(params: CompareParams, params_path: str | Path, shard_dir: str | Path, evaluator_dir: str | Path,
            out_dir: str | Path) -> str:
    import pandas as pd

    from components.train import train

    out_dir, data = Path(out_dir), read_params(params_path)
    project_dir = Path(params_path).resolve().parent
    train_base = _section(data, "train", params.train_profile, params.train, str(params_path))
    eval_params = EvaluateParams.model_validate(
        _section(data, "evaluate", params.evaluate_profile, params.evaluate, str(params_path)))
    results, rows = {}, {}
    for objective in params.objectives:
        folder = out_dir / objective
        train_params = TrainParams.model_validate(deep_merge(train_base, {
            "objective": {"name": objective},
            "distributed": {"storage_path": str((folder / "ray").resolve())}}))
        log.info("compare: training %s", objective)
        train(train_params, shard_dir, folder / "model", folder / "train_run.json", project_dir=project_dir)
        log.info("compare: evaluating %s", objective)
        results[objective] = evaluate(eval_params, str(folder / "model"), evaluator_dir, shard_dir,
                                      folder / "evaluation", folder / "train_run.json", project_dir=project_dir)
        frame = pd.read_csv(folder / "evaluation" / "per_nfe.csv")
        rows[objective] = frame[frame.weights == "ema"].to_dict("records")

    text = table(results)
    with atomic_dir(out_dir / "summary") as tmp:
        (tmp / "table.md").write_text(text)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        plot_fid({NAMES[o]: fid_curve(r) for o, r in rows.items()}, next(iter(results.values()))["floor"]["fid"],
                 tmp / "fid_vs_nfe.png", "Same network, data and budget")
    return text


def run(params_path: str | Path, shard_dir: str | Path, evaluator_dir: str | Path, out_dir: str | Path) -> str:
    """CLI entry: params.yaml's ``compare`` section (with its profile)."""
    params = load_section("compare", CompareParams, params_path)
    return compare(params, params_path, shard_dir, evaluator_dir, out_dir)
