"""Real Ray Train + DeepSpeed + MLflow on 2 CPU workers: train, checkpoint, resume, survive a failure.

One 6-step ZeRO-2 run (checkpoint at step 3, sample grid at 3 and 6) is the reference every other
test compares with: same seed and data, so losses and final EMA weights must agree.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from components.common.tracking import Tracking
from components.train.stage import train

from .conftest import assert_same_weights, export_weights, loss_history, tiny_params, train_through_a_worker_failure

pytestmark = pytest.mark.slow


def test_zero2_run_trains_checkpoints_tracks_and_exports(reference):
    from mlflow import MlflowClient

    import tim_core

    project, result = reference
    assert result.step == 6 and result.images == 6 * 16
    assert json.loads((project / "train_run.json").read_text())["run_id"] == result.run_id

    # Ray kept the last two checkpoints (steps 3 and 6), each with DeepSpeed's files, EMA and RNG states.
    checkpoints = sorted(p for p in (project / "runs" / "train" / f"train-{result.identity}").iterdir() if p.is_dir())
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        files = {p.name for p in checkpoint.iterdir()}
        assert {"latest", "ema.pt", "state.json", "rng-rank0.pt", "rng-rank1.pt"} <= files
    assert [json.loads((c / "state.json").read_text())["step"] for c in checkpoints] == [3, 6]

    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed.zero_stage"] == "2" and run.data.params["optim.global_batch"] == "16"
    assert run.data.tags["tim.data.version"] == result.data_version
    assert "mlflow.source.git.commit" in run.data.tags
    for key in ("train/loss", "train/raw_mse", "train/weighted_loss", "train/grad_norm", "train/lr",
                "perf/images_per_s", "perf/step_time_s"):
        assert key in run.data.metrics, key
    assert sorted(loss_history(result.tracking_uri, result.run_id)) == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(result.tracking_uri)
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} == {
        "model/config.json", "model/model.safetensors", "model/raw"}
    assert any(a.path == "images" for a in client.list_artifacts(result.run_id))

    # The raw weights are exported beside the EMA for evaluation; after 6 steps they differ from the average.
    raw, ema = export_weights(project / "model" / "raw"), export_weights(project / "model")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    model, transport = tim_core.load_pretrained(project / "model")
    noise = torch.randn(4, model.in_channels, *model.input_size, generator=torch.Generator().manual_seed(0))
    out = tim_core.sample(model, noise, torch.tensor([0, 1, 2, 3]), steps=2, transport=transport)
    assert out.samples.shape == noise.shape and torch.isfinite(out.samples).all()


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_every_zero_stage_follows_the_same_losses_and_ema(reference, stage, shards, tmp_path):
    project, ref = reference
    params = tiny_params(distributed={"zero_stage": stage}, schedule={"checkpoint_every": 6, "sample_every": 0})
    result = train(params, shards, tmp_path / "model", project_dir=tmp_path)
    assert loss_history(result.tracking_uri, result.run_id) == pytest.approx(
        loss_history(ref.tracking_uri, ref.run_id), rel=1e-3)
    # Partitioning changes only the order of float reductions; a few near-zero Adam updates may flip, so
    # compare whole tensors (relative norm) rather than single entries.
    for weights in ("", "raw"):
        got, want = export_weights(tmp_path / "model" / weights), export_weights(project / "model" / weights)
        for key, value in got.items():
            assert (value - want[key]).norm() <= 1e-3 * want[key].norm() + 1e-6, f"{weights or 'ema'} {key}"


def test_restart_resumes_from_checkpoint_into_the_same_run_on_a_postgres_server(reference, shards, tmp_path,
                                                                                  mlflow_server):
    project, ref = reference
    steps_seen = tmp_path / "steps.txt"

    def record(rank: int, step: int) -> None:
        if rank == 0:
            with open(steps_seen, "a") as f:
                f.write(f"{step}\n")

    server = Tracking(mlflow_server)
    first = train(tiny_params(schedule={"max_steps": 3}), shards, tmp_path / "model", tracking=server,
                  project_dir=tmp_path, on_step=record)
    second = train(tiny_params(), shards, tmp_path / "model", tracking=server, project_dir=tmp_path, on_step=record)

    assert (first.step, second.step) == (3, 6)
    assert steps_seen.read_text().split() == ["1", "2", "3", "4", "5", "6"], "the restart did not begin at step 4"
    assert second.run_id == first.run_id and second.identity == ref.identity
    assert loss_history(mlflow_server, second.run_id) == pytest.approx(
        loss_history(ref.tracking_uri, ref.run_id), rel=1e-4)
    # Optimizer, scheduler, EMA, RNG and data position all came back: same weights as the one-go run.
    assert_same_weights(export_weights(tmp_path / "model"), export_weights(project / "model"), atol=1e-5)


def test_a_worker_failure_restarts_from_the_last_checkpoint(reference, shards, tmp_path):
    project, ref = reference
    train_through_a_worker_failure(shards, tmp_path)   # data.resume: exact (the default) replays the stream
    assert_same_weights(export_weights(tmp_path / "model"), export_weights(project / "model"), atol=1e-5)


@pytest.mark.timeout(600)
def test_time_budget_stops_every_rank_at_one_step_with_accumulation_and_pruning(local_ray, shards, tmp_path):
    """max_minutes cuts a 1,000-step run: every rank leaves at the same step, and the result, the final checkpoint's
    state and the export all say that step; gradient accumulation trains; only keep_checkpoints checkpoints remain."""
    def record(rank: int, step: int) -> None:  # runs in each Ray worker: report through a file per rank
        (tmp_path / f"rank{rank}.txt").write_text(str(step))

    # The budget counts from the command's start (Ray and DeepSpeed start-up included), so it leaves room for them.
    params = tiny_params(optim={"grad_accum": 2}, schedule={"max_steps": 1000, "max_minutes": 1.0,
                                                            "checkpoint_every": 2, "keep_checkpoints": 1,
                                                            "sample_every": 0})
    result = train(params, shards, tmp_path / "model", project_dir=tmp_path, on_step=record)
    ranks = {int((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)}
    assert ranks == {result.step} and 0 < result.step < 1000, (ranks, result.step)
    assert result.images == result.step * 16
    checkpoints = [p for p in (tmp_path / "runs" / "train" / f"train-{result.identity}").iterdir() if p.is_dir()]
    assert len(checkpoints) == 1, f"keep_checkpoints=1 left {sorted(p.name for p in checkpoints)}"
    assert json.loads((checkpoints[0] / "state.json").read_text())["step"] == result.step
    exported = json.loads((tmp_path / "model" / "config.json").read_text())["train"]
    assert exported["step"] == result.step and exported["weights"] == "ema"
    losses = loss_history(result.tracking_uri, result.run_id)
    assert sorted(losses) == list(range(1, result.step + 1)) and all(map(math.isfinite, losses.values()))
