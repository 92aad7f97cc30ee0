"""The ``ray_jobs`` training mode against a real Ray head, as one script so that it can run in a private network
namespace with the head (test_run_local.py starts it under ``unshare -n``): nothing it starts is reachable from
outside, whatever Ray binds.

  python -m tests.pipelines.ray_jobs_scenario SPEC.json RESULT.json

SPEC: {"root", "params", "shards", "sets": [...], "cases": {name: {"sets": [...], "cancel_on": text|null}}}.
Each case is pipelines.tasks.train_ray_jobs run in its own process, as the Kubeflow component runs it, with the
cluster's token in RAY_AUTH_TOKEN (the Secret the pipeline maps). Cases without ``cancel_on`` run side by side;
a ``cancel_on`` case gets SIGTERM once its output shows that text. RESULT: per case its exit code, output, and
the status of its Ray job as the cluster reports it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.pipelines.ray_head import ray_head

CASE_TIMEOUT_S = 420.0
CODE = """
import json, sys
from pipelines.tasks import train_ray_jobs
spec = json.loads(sys.argv[1])
train_ray_jobs(spec["address"], "cpu-tiny", spec["sets"], spec["shards"], spec["model"], spec["run_file"])
"""


def start(name: str, case: dict, spec: dict, address: str, token: str) -> subprocess.Popen:
    root = Path(spec["root"]) / name
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TIM_PARAMS": spec["params"], "RAY_AUTH_TOKEN": token, "HOME": str(root)}
    env.pop("RAY_AUTH_MODE", None)  # the task turns token mode on from RAY_AUTH_TOKEN, as in a pod
    args = {"address": address, "sets": spec["sets"] + case["sets"], "shards": spec["shards"],
            "model": str(root / "model"), "run_file": str(root / "train_run.json")}
    return subprocess.Popen([sys.executable, "-c", CODE, json.dumps(args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=root)


def follow(proc: subprocess.Popen, cancel_on: str | None, lines: list[str]) -> dict:
    """Read the task's output to its end (SIGTERM once ``cancel_on`` shows); its exit code and when it was
    cancelled."""
    killer = threading.Timer(CASE_TIMEOUT_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    cancelled_at = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if cancel_on and cancelled_at is None and cancel_on in line:
                cancelled_at = time.monotonic()
                proc.send_signal(signal.SIGTERM)
        return {"exit_code": proc.wait(), "cancelled": cancelled_at is not None}
    finally:
        killer.cancel()


def main(spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    results: dict[str, dict] = {}
    started = time.monotonic()
    with ray_head(Path(spec["root"]) / "head") as head:
        results["_head_s"] = round(time.monotonic() - started, 1)
        cases = spec["cases"]
        for batch in ([n for n in cases if not cases[n]["cancel_on"]], [n for n in cases if cases[n]["cancel_on"]]):
            outputs: dict[str, list[str]] = {n: [] for n in batch}
            t0 = time.monotonic()
            procs = {n: start(n, cases[n], spec, head.dashboard, head.token) for n in batch}
            threads = {n: threading.Thread(target=lambda n=n, proc=procs[n], lines=outputs[n]: results.__setitem__(
                n, follow(proc, cases[n]["cancel_on"], lines))) for n in batch}
            for t in threads.values():
                t.start()
            for t in threads.values():
                t.join()
            for n in batch:
                results[n].update(output="".join(outputs[n]), seconds=round(time.monotonic() - t0, 1))
        os.environ["RAY_AUTH_TOKEN"] = head.token
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray.job_submission import JobSubmissionClient

        jobs = {j.submission_id: j for j in JobSubmissionClient(head.dashboard).list_jobs() if j.submission_id}
        for name in cases:
            ids = [i for i in jobs if i in results[name]["output"]]
            results[name]["job_status"] = jobs[ids[0]].status.value if ids else None
    Path(result_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
