"""Session fixtures of the infra checks: the rendered overlays, and one offline checkov run over everything."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import string
import subprocess
from typing import Any

import pytest

from tests.infra.manifests import (
    DOCKERFILE, INFRA, K8S, OVERLAYS, dump_all, example_rayjobs, render_overlay, run, rayjob_pods, tool,
)

# A manifest that must fail the scan (privileged, no limits, no probes, a literal credential): proves in every
# run that checkov parsed and judged the files, a scan that silently read nothing would pass everything. It is
# left out of the verdict on the project's files.
CANARY = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: canary
  namespace: canary
spec:
  selector:
    matchLabels: {app: canary}
  template:
    metadata:
      labels: {app: canary}
    spec:
      containers:
        - name: canary
          image: busybox
          securityContext:
            privileged: true
          env:
            - name: AWS_ACCESS_KEY_ID
              value: {key_id}
            - name: AWS_SECRET_ACCESS_KEY
              value: "{secret}"
"""


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render_overlay(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def template_job() -> dict[str, Any]:
    from pipelines.rayjob import load_template

    return load_template()


@pytest.fixture(scope="session")
def rendered_jobs() -> dict[str, dict[str, Any]]:
    return example_rayjobs()


def offline_env() -> dict[str, str]:
    """checkov without the network: no platform key, no policy download, no update check."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BC_API_KEY", "PRISMA_", "BC_FROM_BRANCH", "BC_REPO"))}
    env.update(CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE", LOG_LEVEL="WARNING")
    return env


def no_network_prefix() -> list[str]:
    """`unshare -n` where this user may make a network namespace (root here): then checkov provably cannot
    reach anything. Elsewhere the environment above keeps it off the network."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.fixture(scope="session")
def checkov(rendered, template_job, rendered_jobs, tmp_path_factory) -> dict[str, Any]:
    """One checkov run (kubernetes, dockerfile, secrets) over the rendered overlays, the pods of the RayJob
    template and of the rendered RayJobs, the Dockerfile, and the canary. Returns the JSON report by framework,
    plus the file names scanned."""
    scan = tmp_path_factory.mktemp("checkov")
    files = {f"overlay-{name}.yaml": dump_all(objs) for name, objs in rendered.items()}
    files["rayjob-template-pods.yaml"] = dump_all(rayjob_pods(template_job))
    for name, job in rendered_jobs.items():
        files[f"rayjob-{name}-pods.yaml"] = dump_all(rayjob_pods(job))
    # a literal credential, made up here (never in the repository), for the secrets checks to find
    key_id = "AKIA" + "".join(random.SystemRandom().choice(string.ascii_uppercase + string.digits) for _ in range(16))
    files["canary/canary.yaml"] = CANARY.replace("{key_id}", key_id).replace(
        "{secret}", base64.b64encode(os.urandom(30)).decode())
    for name, text in files.items():
        (scan / name).parent.mkdir(parents=True, exist_ok=True)
        (scan / name).write_text(text)
    shutil.copy(DOCKERFILE, scan / "Dockerfile")

    cmd = no_network_prefix() + [tool("checkov"), "--config-file", str(INFRA / "checkov.yaml"),
                                 "--directory", str(scan), "--output", "json"]
    result = run(cmd, env=offline_env(), timeout=300, cwd=scan)
    assert result.returncode in (0, 1), f"checkov did not run (exit {result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    # a framework with no result at all comes back as a bare summary, without check_type
    return {"by_framework": {r["check_type"]: r for r in reports if "check_type" in r},
            "files": sorted(files) + ["Dockerfile"], "dir": scan}

