"""Real process faults: the training driver is SIGKILLed (no cleanup runs) and the same command is run again.

The rerun must continue the same MLflow run, log every step once, and end with the weights of the run that was
never interrupted (the session's reference run: same params, seed and data).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import (
    REPO,
    assert_same_weights,
    export_weights,
    loss_history,
    tiny_params,
    train_through_a_worker_failure,
)

pytestmark = pytest.mark.slow


def killed_then_rerun(kill_at: int, shards, project) -> tuple[list[int], list[int], object]:
    """Steps rank 0 finished before the SIGKILL and in the rerun, and the rerun's result."""
    from components.train.stage import train

    project.mkdir()
    killed, rerun = project / "steps-killed.txt", project / "steps-rerun.txt"
    spec = {"kill_at": kill_at, "steps_file": str(killed), "project": str(project), "shards": str(shards)}
    # A session of its own: the kill takes the driver and every Ray process it started, and nothing else.
    log = project / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.train.kill_driver", json.dumps(spec)], cwd=REPO,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left if the driver ended some other way
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed (exit {proc.returncode}):\n" \
                                               f"{log.read_text()[-2000:]}"

    def record(rank: int, step: int) -> None:
        if rank == 0:
            with open(rerun, "a") as f:
                f.write(f"{step}\n")

    result = train(tiny_params(), shards, project / "model", project_dir=project, on_step=record)
    steps = [[int(s) for s in path.read_text().split()] for path in (killed, rerun)]
    return steps[0], steps[1], result


@pytest.mark.timeout(600)
def test_sigkill_after_a_checkpoint_continues_from_it_in_the_same_run(reference, local_ray, shards, tmp_path):
    project, ref = reference
    before, after, result = killed_then_rerun(4, shards, tmp_path / "project")
    assert before == [1, 2, 3, 4]
    assert after == [4, 5, 6], "the rerun did not continue at the step after the step-3 checkpoint"
    runs = json.loads((tmp_path / "project" / "runs" / "train" / f"train-{result.identity}.mlflow.json").read_text())
    assert runs["run_id"] == result.run_id and result.identity == ref.identity
    # Steps 4 was logged by the killed attempt (if its window closed) and repeated by the rerun: once in the run.
    assert sorted(loss_history(result.tracking_uri, result.run_id)) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(export_weights(tmp_path / "project" / "model"), export_weights(project / "model"),
                        atol=1e-5)


@pytest.mark.timeout(600)
def test_sigkill_at_the_first_checkpoint_leaves_nothing_to_resume_from(reference, local_ray, shards, tmp_path):
    """Killed when step 3 ends, as the step-3 checkpoint was about to be written: that checkpoint never
    completed, so the rerun starts at step 1, still in the same MLflow run, and logs each step once."""
    project, _ = reference
    before, after, result = killed_then_rerun(3, shards, tmp_path / "project")
    assert before == [1, 2, 3] and after == [1, 2, 3, 4, 5, 6]
    assert sorted(loss_history(result.tracking_uri, result.run_id)) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(export_weights(tmp_path / "project" / "model"), export_weights(project / "model"),
                        atol=1e-5)


@pytest.mark.timeout(600)
def test_reshuffle_resume_continues_at_the_checkpoint_with_a_new_data_order(reference, shards, tmp_path):
    """data.resume: reshuffle. A worker fails once after step 4 (Ray restarts the group, max_failures = 1): the
    restart continues at step 4 from the step-3 checkpoint, not at step 0, and starts a new shuffle there.
    Steps 1-3 are the reference run's (the same order before the failure); step 4 starts from the same weights
    and RNG state as the reference's step 4 (the exact resume of test_distributed.py replays it to 1e-5), so its
    raw MSE differs from the reference's only through the batch: a different data order. (train/loss cannot
    tell: with the adaptive weighting each row's term is w L / (L + c), about the mean weight whatever the data.)"""
    project, ref = reference
    result = train_through_a_worker_failure(shards, tmp_path, data={"resume": "reshuffle"})
    assert result.identity == ref.identity   # resume is a runtime knob
    mse, ref_mse = raw_mse(result.tracking_uri, result.run_id), raw_mse(ref.tracking_uri, ref.run_id)
    assert [mse[s] for s in (1, 2, 3)] == pytest.approx([ref_mse[s] for s in (1, 2, 3)], rel=1e-5)
    for s in (4, 5, 6):
        assert mse[s] != pytest.approx(ref_mse[s], rel=1e-3), f"step {s}: the batch of the uninterrupted run"
    weights, ref_weights = export_weights(tmp_path / "model"), export_weights(project / "model")
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) > 1e-4


def raw_mse(tracking_uri: str, run_id: str) -> dict[int, float]:
    """train/raw_mse per step: the unweighted MSE, which depends on the batch (train/loss hardly does)."""
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, "train/raw_mse")}
