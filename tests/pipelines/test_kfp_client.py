"""`tim pipeline submit | schedule | unschedule` against a recording stand-in of the KFP REST API on 127.0.0.1
(tests/pipelines/kfp_server.py): the pipeline spec, parameters, cron, concurrency and catch-up that reach it,
and the errors a user sees when the host, the input or the answer is wrong. The one part of the Kubeflow work
not run against a real backend here (none can run on these machines)."""

from __future__ import annotations

import pytest
import yaml

from components.cli import app
from pipelines.pipeline import COMPILED
from tests.pipelines.kfp_server import API, kfp_server
from tests.services import free_port


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))             # kfp.Client's context file, if it writes one
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    monkeypatch.chdir(COMPILED.parents[2])                  # params.yaml of this checkout checks --set


def tim(capsys, *args: str) -> tuple[int, str, str]:
    """The `tim` command in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as done:
        app(args=list(args), prog_name="tim")
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def spec_of(upload: bytes) -> dict:
    return next(yaml.safe_load_all(upload))


def test_submit_uploads_the_pipeline_then_new_versions_and_runs_them(capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "t0ken")
    with kfp_server() as (url, seen):
        code, out, err = tim(capsys, "pipeline", "submit", "--host", url, "--profile", "cpu-tiny",
                             "--set", "train.optim.global_batch=32", "--param", "train_mode=ray_jobs",
                             "--param", "ray_workers=2", "--param", "gate={min_rel_improvement: 0.05}",
                             "--run-name", "first")
        assert code == 0, err
        upload = seen.sent("POST", f"{API}/pipelines/upload")[0]
        assert upload.query["name"] == "tim" and upload.files["uploadfile"] == COMPILED.read_bytes()
        assert upload.headers["authorization"] == "Bearer t0ken"
        run = seen.sent("POST", f"{API}/runs")[0].json
        assert run["display_name"] == "first" and run["service_account"] == "tim-pipeline"
        assert run["pipeline_version_reference"] == {"pipeline_id": "p1", "pipeline_version_id": "p1-v1"}
        assert run["experiment_id"] == "e1" and seen.experiments == {"tim": "e1"}
        assert run["runtime_config"]["parameters"] == {
            "train_mode": "ray_jobs", "ray_workers": 2, "gate": {"min_rel_improvement": 0.05},
            "params_profile": "cpu-tiny", "params_set": ["train.optim.global_batch=32"]}
        assert "run r1 (first) of pipeline tim" in out

        # Again, compiled for another image: a new version of the same pipeline, and the run is of that version.
        code, out, err = tim(capsys, "pipeline", "submit", "--host", url, "--image", "registry.example.com/tim:0.2.0")
        assert code == 0, err
        version = seen.sent("POST", f"{API}/pipelines/upload_version")[0]
        assert version.query["pipelineid"] == "p1" and version.query["name"].startswith("tim-")
        sent = spec_of(version.files["uploadfile"])
        assert {e["container"]["image"] for e in sent["deploymentSpec"]["executors"].values()} == \
               {"registry.example.com/tim:0.2.0"}
        assert seen.sent("POST", f"{API}/runs")[1].json["pipeline_version_reference"]["pipeline_version_id"] == "p1-v2"
        assert len(seen.sent("POST", f"{API}/pipelines/upload")) == 1


def test_schedule_runs_the_latest_version_one_at_a_time_without_catch_up(capsys):
    with kfp_server() as (url, seen):
        code, out, err = tim(capsys, "pipeline", "schedule", "--host", url, "--cron", "0 0 3 * * 1",
                             "--param", "init_from=models:/tim-mnist@champion", "--param", "data_source=s3",
                             "--param", "data_root=s3://tim-data/digits")
        assert code == 0, err
        body = seen.sent("POST", f"{API}/recurringruns")[0].json
        assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
        assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
        assert body["mode"] == "ENABLE" and body["display_name"] == "tim-retrain"
        assert body["pipeline_version_reference"] == {"pipeline_id": "p1"}    # no version: the latest at each run
        assert body["runtime_config"]["parameters"] == {
            "init_from": "models:/tim-mnist@champion", "data_source": "s3", "data_root": "s3://tim-data/digits"}
        assert body["service_account"] == "tim-pipeline"
        assert "one run at a time, no catch-up" in out

        code, out, _ = tim(capsys, "pipeline", "schedule", "--host", url, "--cron", "0 30 2 * * *")
        assert code == 0 and "replaced rr1" in out and list(seen.recurring) == ["rr2"]
        assert seen.sent("DELETE", f"{API}/recurringruns/rr1")

        code, out, _ = tim(capsys, "pipeline", "unschedule", "--host", url)
        assert code == 0 and "deleted recurring run rr2" in out and not seen.recurring
        code, out, _ = tim(capsys, "pipeline", "unschedule", "--host", url)
        assert code == 0 and "no recurring run named tim-retrain" in out


@pytest.mark.parametrize("args, code, message", [
    (["--param", "nfe_list=[1, 2]", "--param", "ray_workers=two"], 2,
     "--param ray_workers='two': ray_workers is number integer, got str"),
    (["--param", "nosuch=1"], 2, "--param nosuch: the pipeline has no such parameter"),
    (["--set", "train.optim.learning_rate=1"], 2, "train.optim.learning_rate: unknown key; allowed: global_batch"),
    (["--param", "train_mode=slurm"], 2, "train_mode: 'slurm'; allowed: in_pod, ray_jobs, kuberay"),
    (["--image", "tim pipeline:latest"], 2, "--image: the project's image"),
])
def test_bad_input_fails_before_anything_is_sent(capsys, args, code, message):
    with kfp_server() as (url, seen):
        got, out, err = tim(capsys, "pipeline", "submit", "--host", url, *args)
        assert got == code and message in err, err
        assert seen.requests == []


def test_service_errors_tell_retry_from_fix(capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = tim(capsys, "pipeline", "submit", "--host", closed)
    assert code == 75 and f"error: KFP at {closed} is unreachable" in err
    code, _, err = tim(capsys, "pipeline", "schedule", "--host", closed, "--cron", "0 3 * * 1")
    assert code == 2 and "KFP's cron has 6 fields, seconds first" in err
    with kfp_server() as (url, seen):
        seen.fail_with = 401
        code, _, err = tim(capsys, "pipeline", "submit", "--host", url)
        assert code == 2 and "refused it: HTTP 401" in err and "KF_PIPELINES_TOKEN" in err
        seen.fail_with = 503
        code, _, err = tim(capsys, "pipeline", "unschedule", "--host", url)
        assert code == 75 and "answered HTTP 503" in err
