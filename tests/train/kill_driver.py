"""A training driver that SIGKILLs itself: run as ``python -m tests.train.kill_driver SPEC_JSON``.

Rank 0 appends each finished step to ``steps_file``; at ``kill_at`` it SIGKILLs the driver and every process
under it (the Ray processes the driver started, every worker, itself last), as a preempted node would: nothing
runs on, nothing cleans up. (Ray starts some of its processes in sessions of their own, so a process-group kill
would miss them.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from components.train.stage import train
from tests.train.conftest import tiny_params


def main(spec: dict) -> None:
    driver, kill_at, steps_file = os.getpid(), spec["kill_at"], spec["steps_file"]

    def on_step(rank: int, step: int) -> None:  # runs in the Ray worker processes
        if rank == 0:
            with open(steps_file, "a") as f:
                f.write(f"{step}\n")
            if step == kill_at:
                import psutil

                doomed = [psutil.Process(driver), *psutil.Process(driver).children(recursive=True)]
                for process in doomed:
                    if process.pid != os.getpid():
                        process.kill()
                os.kill(os.getpid(), signal.SIGKILL)

    project = Path(spec["project"])
    train(tiny_params(), spec["shards"], project / "model", project_dir=project, on_step=on_step)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
