"""`tim pipeline run-local`: the whole Kubeflow pipeline on this machine with kfp.local's subprocess runner (each
task a Python process of this environment, the checkout's params.yaml, the MLflow store of the usual rule), with
KFP's caching: a second run on an unchanged source reuses the data tasks' outputs.

Outputs land in ``<pipeline_root>/tim-<timestamp>/<task>/<output>``; a cached task's outputs stay where the run
that made them put them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common.errors import TimError
from pipelines.inputs import DATA_STAGES, form_arguments, form_values, validated_overrides
from pipelines.kfp_client import form_of
from pipelines.pipeline import PIPELINE_NAME, build
from pipelines.runtime import ERROR_SUFFIX, EXIT_MEANING, RECORD_SUFFIX, REPORTS_ENV

# Any name works for the subprocess runner (it runs this environment); it warns unless the name says python.
LOCAL_IMAGE = "local-python"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TaskError(TimError):
    """A task of a local run failed; carries the task's own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LocalRun:
    run_dir: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)   # task -> record (inputs/outputs URIs)
    cached: list[str] = field(default_factory=list)                  # data tasks whose outputs were reused
    seconds: float = 0.0

    def output(self, task: str, name: str) -> Path:
        """Where ``task``'s output ``name`` is: its own record, else (cached) the record of a task that read it."""
        if task in self.tasks:
            return Path(self.tasks[task]["outputs"][name])
        for record in self.tasks.values():
            for value in record["inputs"].values():
                if Path(value).parent.name == task and Path(value).name == name:
                    return Path(value)
        raise KeyError(f"no output {name!r} of task {task!r} in run {self.run_dir}")


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in folder.glob(f"*{RECORD_SUFFIX}"):
        record = json.loads(path.read_text())
        records[record["task"]] = record
    return records


def run_local(*, params: Path, pipeline_root: Path, profile: str | None = None, sets: tuple[str, ...] = (),
              form: Mapping[str, str] | None = None, cache_model_tasks: bool = False) -> LocalRun:
    """Run the pipeline to its end; TaskError (the task's exit code) when a task fails."""
    from kfp import local

    pipeline = build(LOCAL_IMAGE, params_path=str(Path(params).resolve()), mlflow_tracking_uri="",
                     cache_model_tasks=cache_model_tasks)
    from google.protobuf import json_format

    form_spec = form_of(json_format.MessageToDict(pipeline.pipeline_spec))   # the form as the compiled YAML has it
    args = form_arguments(form_spec, form or {})
    if profile:
        args["params_profile"] = profile
    if sets:
        args["params_set"] = list(sets)
    validated_overrides(form_values(form_spec, args), params)  # bad input fails before any task starts
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    reports = Path(tempfile.mkdtemp(prefix="tim-task-reports-"))
    previous = os.environ.get(REPORTS_ENV)
    os.environ[REPORTS_ENV] = str(reports)
    started = time.monotonic()
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   enable_caching=True, cache_root=str(pipeline_root / ".kfp_cache"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            try:
                pipeline(**args)
            except RuntimeError as exc:
                raise _task_error(exc, reports) from None
        new = sorted(set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before)
        run = LocalRun(run_dir=new[-1], tasks=_records(reports), seconds=time.monotonic() - started)
        run.cached = [t for t in DATA_STAGES if t not in run.tasks]
        return run
    finally:
        if previous is None:
            os.environ.pop(REPORTS_ENV, None)
        else:
            os.environ[REPORTS_ENV] = previous
        shutil.rmtree(reports, ignore_errors=True)


def _task_error(exc: RuntimeError, reports: Path) -> TaskError:
    failures = [json.loads(p.read_text()) for p in reports.glob(f"*{ERROR_SUFFIX}")]
    if failures:
        f = failures[0]
        return TaskError(f"task {f['task']} failed: {f['error']}", f["exit_code"])
    plain = ANSI.sub("", str(exc))
    match = re.search(r"Inner task failed: '([\w-]+)'", plain)
    return TaskError(f"task {match.group(1) if match else '?'} failed (its log is above): {plain}", 1)


def summary(run: LocalRun) -> str:
    """Where a person finds what the run made."""
    lines = [f"run folder: {run.run_dir} ({run.seconds:.0f} s)"]
    if run.cached:
        lines.append(f"cached (unchanged source and params, outputs of an earlier run reused): {', '.join(run.cached)}")
    wanted = [("shard", "shards", "webdataset shards"), ("encode", "encoded", "training data"),
              ("validate", "data_docs", "data validation (HTML)"),
              ("plan", "summary", "training decision"), ("train", "model", "model"),
              ("evaluate", "report", "evaluation report (HTML)"), ("evaluate", "evaluation", "evaluation files"),
              ("samples", "grid", "sample grid (HTML)"), ("register", "registered", "registered version"),
              ("promote", "reasons", "promotion decision")]
    for task, name, what in wanted:
        try:
            lines.append(f"  {what}: {run.output(task, name)}")
        except KeyError:
            continue
    plan = run.tasks.get("plan")
    if plan and "train" not in run.tasks:
        lines.append("  " + Path(plan["outputs"]["summary"]).read_text().strip().splitlines()[2])
    promoted = run.tasks.get("promote")
    if promoted:
        d = json.loads(Path(promoted["outputs"]["decision"]).read_text())
        lines.append(f"  decision: {d['model']} version {d['challenger']['version']} {d['verdict'].upper()}; "
                     f"aliases {d['aliases']}")
    return "\n".join(lines)


def exit_meaning(code: int) -> str:
    return EXIT_MEANING.get(code, "failed")
