"""Training mode ``ray_jobs``: `tim train` submitted to an existing Ray cluster through the Ray Jobs API.

The job's working folder (shipped by Ray to every node) holds the task's shards and params.yaml; its entrypoint
is the `tim train` command with the task's ``--profile`` / ``--set`` and the task's MLflow store, so the job
tracks where the pipeline reads. The job's logs are streamed into the task's log; the task fails when the job
fails (with the driver's exit code when it is 2 or 75), and stops the job when the task is cancelled. When the
job succeeded, the model and run file come back through MLflow (pipelines/remote.py).

Needs ``ray[default]`` (the Jobs API client) and the cluster's dashboard address (``http://HEAD:8265``). With
Ray's token authentication the token comes from ``RAY_AUTH_TOKEN`` (a Kubernetes Secret in the pipeline).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from components.common.errors import Unreachable, UserError
from pipelines.remote import train_command, working_dir

# How long a cancelled task waits for the stopped job to reach a terminal state before giving up on it.
STOP_WAIT_S = 30.0


@dataclass(frozen=True)
class JobOutcome:
    submission_id: str
    status: str
    exit_code: int | None
    message: str


def client(address: str):
    """A Jobs API client for ``address`` (the dashboard URL); Unreachable when nothing answers there."""
    if not address:
        raise UserError("train_mode ray_jobs needs the pipeline parameter ray_address: the Ray dashboard URL of "
                        "the cluster, e.g. http://raycluster-head-svc:8265")
    if os.environ.get("RAY_AUTH_TOKEN") and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray when the client is made
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise Unreachable(f"Ray cluster at {address} does not answer: {exc}") from None
    except Exception as exc:  # the SDK raises bare RuntimeError/ValueError for refused or bad answers
        raise Unreachable(f"Ray cluster at {address} refused the connection: {exc}") from None


async def _stream(jobs, submission_id: str) -> None:
    async for chunk in jobs.tail_job_logs(submission_id):
        print(chunk, end="", flush=True)


def follow(jobs, submission_id: str) -> JobOutcome:
    """Stream the job's logs until it ends; its final status."""
    try:
        asyncio.run(_stream(jobs, submission_id))
    except RuntimeError as exc:  # the log socket closed early: the status below says why
        print(f"(log stream ended: {exc})", flush=True)
    while True:
        info = jobs.get_job_info(submission_id)
        if info.status.is_terminal():
            return JobOutcome(submission_id, str(info.status.value), info.driver_exit_code, info.message or "")
        time.sleep(1.0)


def stop(jobs, submission_id: str) -> str:
    """Stop the job and wait (a little) for it to end; what happened, for the task's log."""
    try:
        jobs.stop_job(submission_id)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            status = jobs.get_job_status(submission_id)
            if status.is_terminal():
                return f"Ray job {submission_id} {status.value.lower()}"
            time.sleep(0.5)
        return f"Ray job {submission_id} asked to stop; still not ended after {STOP_WAIT_S:.0f} s"
    except Exception as exc:  # the cluster may be the reason we are stopping
        return f"could not stop Ray job {submission_id}: {exc}"


def run(address: str, *, shards: Path, params: Path, profile: str, sets: list[str], tracking_uri: str,
        identity: str, scratch: Path) -> tuple[JobOutcome, int]:
    """Submit, follow and (when interrupted) stop one training job; (outcome, submission time in ms)."""
    jobs = client(address)
    folder = working_dir(scratch / "job", shards, params)
    submission_id = f"tim-train-{identity}-{uuid.uuid4().hex[:8]}"
    submitted_ms = int(time.time() * 1000)
    command = shlex.join(train_command(profile, sets, tracking_uri))
    print(f"submitting Ray job {submission_id} to {address}: {command}", flush=True)
    jobs.submit_job(entrypoint=command, submission_id=submission_id, runtime_env={"working_dir": str(folder)},
                    metadata={"tim.train.identity": identity})
    try:
        outcome = follow(jobs, submission_id)
    except BaseException:
        print(stop(jobs, submission_id), flush=True)
        raise
    return outcome, submitted_ms


def failure_code(outcome: JobOutcome) -> int:
    """The task's exit code for a job that did not succeed: the driver's own 2 or 75; a job stopped from outside
    or a driver that died without a code can be run again (75); any other code is a bug (1)."""
    if outcome.exit_code in (2, 75):
        return outcome.exit_code
    if outcome.status == "STOPPED" or outcome.exit_code is None:
        return 75
    return 1

