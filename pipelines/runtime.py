"""What every Kubeflow task shares inside the project's image: running a `tim` command in-process (the same
command a person or DVC runs, with ``--params``, ``--profile`` and ``--set`` passed through), the params file of
the image, code digests for cache keys, and how a task fails.

A task that fails prints ``error: task <name>: <cause>`` and exits with the stage's code: 2 for input that must
be fixed, 75 when running again may succeed (a service did not answer, a race, a cancelled run). When
``TIM_TASK_REPORTS`` names a folder (``tim pipeline run-local`` sets it), the failure is also written there as
``<task>.json``, so that the local runner can name the task and the cause.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.common.errors import RetryableError, TimError, UserError

PARAMS_ENV = "TIM_PARAMS"            # params.yaml the tasks read (the image's copy; run-local: the checkout's)
REPORTS_ENV = "TIM_TASK_REPORTS"     # folder for the tasks' records and failures (run-local)
RECORD_SUFFIX, ERROR_SUFFIX = ".run.json", ".error.json"
CODE_TAG = "tim.pipeline.code"       # MLflow run tag: the code digest a pipeline trained with
EXIT_MEANING = {2: "bad input: fix it, retrying cannot help", 75: "retryable: running again may succeed"}


class TaskFailed(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Cancelled(BaseException):
    """The task's process got SIGTERM (the run was cancelled, the pod is being deleted) or SIGINT."""


def _cancel(signum: int, _frame: Any) -> None:
    raise Cancelled(signal.Signals(signum).name)


def task(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a task body: cancellation becomes an exception (so that remote work is stopped in ``finally``
    blocks), and every known failure ends the process with its exit code and one line naming the task."""

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            signal.signal(signal.SIGTERM, _cancel)
            signal.signal(signal.SIGINT, _cancel)
            try:
                result = body(*args, **kwargs)
                _record(name)
                return result
            except TaskFailed as exc:
                _fail(name, exc.exit_code, str(exc))
            except TimError as exc:
                _fail(name, exc.exit_code, str(exc))
            except Cancelled as exc:
                _fail(name, RetryableError.exit_code, f"cancelled ({exc}); nothing after this task ran")

        return run

    return wrap


def _report(name: str, suffix: str, payload: dict[str, Any]) -> None:
    reports = os.environ.get(REPORTS_ENV)
    if reports:
        from components.common.files import write_json

        write_json(Path(reports) / f"{name}{suffix}", {"task": name, **payload})


def _record(name: str) -> None:
    """Where this task read and wrote its artifacts (from KFP's executor input on the command line)."""
    if not os.environ.get(REPORTS_ENV) or "--executor_input" not in sys.argv:
        return
    spec = json.loads(sys.argv[sys.argv.index("--executor_input") + 1])

    def uris(side: dict[str, Any]) -> dict[str, str]:
        return {k: v["artifacts"][0]["uri"] for k, v in side.get("artifacts", {}).items()}

    _report(name, RECORD_SUFFIX, {"inputs": uris(spec.get("inputs", {})), "outputs": uris(spec.get("outputs", {}))})


def _fail(name: str, code: int, message: str) -> None:
    print(f"error: task {name}: {message}\n(exit {code}: {EXIT_MEANING.get(code, 'failed')})", file=sys.stderr,
          flush=True)
    _report(name, ERROR_SUFFIX, {"exit_code": code, "error": message})
    raise SystemExit(code)


def tim(*args: str) -> None:
    """Run ``tim <args>`` in this process (components/cli.py); its errors come back as TaskFailed."""
    import click
    import typer

    from components.cli import app

    print("+ tim " + shlex.join(args), flush=True)
    try:
        typer.main.get_command(app).main(args=list(args), prog_name="tim", standalone_mode=False)
    except TimError as exc:
        raise TaskFailed(exc.exit_code, f"tim {args[0]}: {exc}") from None
    except click.ClickException as exc:
        raise TaskFailed(UserError.exit_code, f"tim {args[0]}: {exc.format_message()}") from None


# --- params ---------------------------------------------------------------------------------------------------
def params_file() -> Path:
    path = os.environ.get(PARAMS_ENV)
    if not path:
        raise TaskFailed(UserError.exit_code, f"${PARAMS_ENV} is not set: the pipeline was compiled without the "
                                              "path of params.yaml in the image")
    if not Path(path).is_file():
        raise TaskFailed(UserError.exit_code, f"${PARAMS_ENV}={path}: no such file in this image")
    return Path(path)


@functools.lru_cache(maxsize=1)
def project_params() -> Path:
    """params.yaml as the tasks pass it: relative paths in it (Ray storage, the embedded MLflow store) are taken
    under its folder, so a read-only copy (the image's /opt) is copied to a writable scratch folder first."""
    path = params_file()
    if os.access(path.parent, os.W_OK):
        return path
    scratch = Path(tempfile.mkdtemp(prefix="tim-project-"))
    shutil.copy2(path, scratch / path.name)
    print(f"{path.parent} is read-only: relative paths of params.yaml are taken under {scratch}", flush=True)
    return scratch / path.name


def params_args(profile: str, sets: Sequence[str]) -> list[str]:
    """``--params``, ``--profile`` and ``--set`` exactly as every `tim` command takes them."""
    args = ["--params", str(project_params())]
    if profile:
        args += ["--profile", profile]
    for assignment in sets:
        args += ["--set", assignment]
    return args


def source(profile: str, sets: Sequence[str]):
    from components.common.params import ParamsSource

    return ParamsSource(project_params(), profile or None, tuple(sets))


def tracking(profile: str, sets: Sequence[str]):
    """The run's MLflow store, by the one rule every stage uses."""
    from components.common.tracking import MlflowParams, Tracking

    src = source(profile, sets)
    return Tracking.resolve(src.load("mlflow", MlflowParams), src.project_dir)


def schemas() -> dict[str, type]:
    """Every section a pipeline run reads, with its schema: checked in the first task, before any work."""
    from components.common.tracking import MlflowParams
    from components.data.encode import EncodeParams
    from components.data.prepare import PrepareParams
    from components.data.shard import ShardParams
    from components.data.validate import ValidateParams
    from components.evaluation.evaluate import EvaluateParams
    from components.evaluation.feature_net import EvaluatorParams
    from components.evaluation.grid import SamplesParams
    from components.registry.client import RegistryParams
    from components.train.settings import TrainParams

    return {"prepare": PrepareParams, "validate": ValidateParams, "shard": ShardParams, "encode": EncodeParams,
            "train": TrainParams,
            "samples": SamplesParams, "train_evaluator": EvaluatorParams, "evaluate": EvaluateParams,
            "registry": RegistryParams, "mlflow": MlflowParams}


# --- code identity --------------------------------------------------------------------------------------------
DATA_CODE = ("components/cli.py", "components/common", "components/data")
ENCODE_CODE = (*DATA_CODE, "tim_core")  # the VAE wrapper (tim_core.latent)
TRAIN_CODE = ("components", "tim_core")


def code_digest(paths: Sequence[str]) -> str:
    """sha256 over the Python files under ``paths`` (relative to the folder holding the packages): the same in a
    checkout and in the image, whatever their install location."""
    import components

    root = Path(components.__file__).resolve().parent.parent
    files: list[Path] = []
    for rel in paths:
        target = root / rel
        files += [target] if target.is_file() else sorted(target.rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
