"""Stage `validate`: a great-expectations suite over the prepared manifest; the gate before `shard`.

Output folder (written atomically):
  result.json          the GX checkpoint results (always, pass or fail)
  docs/index.html      GX data docs for those results (always)
  manifest.csv         copy of the manifest, only when every expectation passed: `shard` reads this,
  dataset.json         so failed data can never be sharded
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from components.common.errors import DataError
from components.common.files import atomic_dir
from components.common.params import StageParams
from components.data.prepare import MANIFEST_COLUMNS, SPLITS, read_manifest

log = logging.getLogger(__name__)

INT_COLUMNS = ("label", "height", "width", "channels")
FLOAT_COLUMNS = ("pixel_mean", "pixel_std")


class ValidateParams(StageParams):
    min_train_per_class: int = Field(10, ge=1)
    min_val_per_class: int = Field(1, ge=1)
    pixel_mean_range: tuple[float, float] = (0.01, 0.99)  # per image, pixels scaled to [0, 1]
    pixel_std_range: tuple[float, float] = (0.01, 0.5)  # a lower bound > 0 rejects blank images
    max_examples: int = Field(5, ge=1)  # offending rows quoted per failed expectation

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ValidateParams:
        for name in ("pixel_mean_range", "pixel_std_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: [min, max] with min <= max, got [{low}, {high}]")
        return self


def manifest_expectations(params: ValidateParams, meta: dict[str, Any]) -> list:
    import great_expectations.expectations as gxe

    classes, image = meta["classes"], meta["image"]
    types = {c: "int64" for c in INT_COLUMNS} | {c: "float64" for c in FLOAT_COLUMNS}
    return [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=MANIFEST_COLUMNS),
        *[gxe.ExpectColumnValuesToBeOfType(column=c, type_=t) for c, t in types.items()],
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in MANIFEST_COLUMNS],
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(classes)))),
        gxe.ExpectColumnPairValuesToBeInSet(
            column_A="label", column_B="class_name", value_pairs_set=[(i, c) for i, c in enumerate(classes)]
        ),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[image["height"]]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[image["width"]]),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[image["channels"]]),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixel_mean", min_value=params.pixel_mean_range[0], max_value=params.pixel_mean_range[1]
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixel_std", min_value=params.pixel_std_range[0], max_value=params.pixel_std_range[1]
        ),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="path"),
    ]


def derived_tables(manifest, meta: dict[str, Any]) -> dict[str, tuple[Any, list[str]]]:
    """Aggregates that row-wise expectations cannot see: counts per class and split, and leakage.

    Returns name -> (dataframe, columns that identify an offending row in messages).
    """
    import pandas as pd

    counts = pd.crosstab(manifest["label"], manifest["split"]).reindex(
        index=range(len(meta["classes"])), columns=list(SPLITS), fill_value=0
    )
    per_class = pd.DataFrame(
        {
            "label": range(len(meta["classes"])),
            "class_name": meta["classes"],
            **{f"{s}_count": counts[s].to_numpy() for s in SPLITS},
        }
    )
    by_image = manifest.groupby("sha256").agg(
        n_splits=("split", "nunique"),
        splits=("split", lambda s: ",".join(sorted(set(s)))),
        ids=("id", lambda s: ",".join(s)),
    )
    return {"class_counts": (per_class, ["class_name"]), "leakage": (by_image.reset_index(), ["sha256", "ids"])}


def derived_expectations(name: str, params: ValidateParams) -> list:
    import great_expectations.expectations as gxe

    if name == "class_counts":
        return [
            gxe.ExpectColumnValuesToBeBetween(column="train_count", min_value=params.min_train_per_class),
            gxe.ExpectColumnValuesToBeBetween(column="val_count", min_value=params.min_val_per_class),
        ]
    return [gxe.ExpectColumnValuesToBeInSet(column="n_splits", value_set=[1])]  # an image in one split only


def describe_failure(table: str, result: dict[str, Any], max_examples: int) -> str:
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k in ("column", "column_A", "column_B")}
    head = f"{table}: {config['type']}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    wanted = {k: v for k, v in config["kwargs"].items() if k in ("value_set", "min_value", "max_value", "regex")}
    if wanted:
        head += " [expected " + ", ".join(f"{k}={v}" for k, v in wanted.items()) + "]"
    if result["exception_info"].get("raised_exception"):
        return f"{head}: could not run: {result['exception_info']['exception_message']}"
    details = result["result"]
    if "unexpected_count" not in details:
        return f"{head}: observed {details.get('observed_value')!r}"
    rows = details.get("unexpected_index_list") or []
    checked = set(kwargs.values())

    def show(row: Any) -> str:  # identifying columns first, then the offending value(s)
        if not isinstance(row, dict):
            return str(row)
        return " ".join(f"{k}={v}" for k, v in sorted(row.items(), key=lambda kv: kv[0] in checked))

    examples = "; ".join(show(row) for row in rows[:max_examples])
    return f"{head}: {details['unexpected_count']} row(s) failed, e.g. {examples}"


def run_suites(tables: dict[str, tuple[Any, list[str]]], suites: dict[str, list], docs_dir: Path) -> list[dict]:
    """Validate each table with its suite in an ephemeral GX context; build data docs into docs_dir."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # opt-in, not opt-out, for a data tool
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    docs_site = {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"validate": docs_site},
        progress_bars=ProgressBarsConfig(globally=False),  # the stage has its own logging; keep logs readable
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("manifest")
    results = []
    for name, (frame, id_columns) in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suites[name]))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["validate"])],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": id_columns},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        for validation in outcome.run_results.values():
            results.append({"table": name, **validation.to_json_dict()})
    return results


def validate(params: ValidateParams, prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """Run the stage with already-validated params; raises DataError naming failed expectations and rows."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    manifest_path = prepared_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run `tim prepare` first")
    manifest = read_manifest(manifest_path)
    meta = json.loads((prepared_dir / "dataset.json").read_text())

    tables = {"manifest": (manifest, ["id", "path"])}
    suites = {"manifest": manifest_expectations(params, meta)}
    if set(MANIFEST_COLUMNS) <= set(manifest.columns):
        for name, table in derived_tables(manifest, meta).items():
            tables[name] = table
            suites[name] = derived_expectations(name, params)

    with atomic_dir(out_dir) as tmp:
        results = run_suites(tables, suites, tmp / "docs")
        success = all(r["success"] for r in results)
        (tmp / "result.json").write_text(json.dumps({"success": success, "validations": results}, indent=2) + "\n")
        if success:
            shutil.copyfile(manifest_path, tmp / "manifest.csv")
            shutil.copyfile(prepared_dir / "dataset.json", tmp / "dataset.json")
    if not success:
        failures = [
            describe_failure(r["table"], e, params.max_examples)
            for r in results
            for e in r["results"]
            if not e["success"]
        ]
        raise DataError(
            f"{manifest_path}: {len(failures)} expectation(s) failed (details: {out_dir / 'docs' / 'index.html'}):\n"
            + "\n".join(f"  - {f}" for f in failures)
        )
    log.info("validate: %d rows passed; data docs at %s", len(manifest), out_dir / "docs" / "index.html")
    return out_dir
