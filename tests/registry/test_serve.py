"""The champion as users reach it: `mlflow models serve` answering HTTP, and the `tim` commands (exit 2 with
`error: ...` on bad input). Embedded SQLite store only: the server backend is covered by test_registry.py."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from components.registry.lease import LEASE_TAG
from tests.registry.conftest import SIZE, free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
GOOD = {1: 40.0, 2: 30.0, 4: 20.0}
# (columns, rows, what the 400 answer must say): one per kind of bad request, the bad row not always the first.
BAD_REQUESTS = [
    (["label"], [[9]], "row 0: label 9 outside 0..2"),
    (["label", "nfe"], [[1, 2], [1, 0]], "row 1: num_images and nfe must be >= 1"),
    (["label", "num_images"], [[1, 0]], "row 0: num_images and nfe must be >= 1"),
    (["label", "num_images"], [[1, 200], [0, 50], [2, 7]], "row 2: num_images 7 brings the request to 257 images"),
    (["label", "num_images"], [[1, 257]], "row 0: num_images 257"),
    (["label", "nfe"], [[1, 2], [2, 1025]], "row 1: nfe 1025 is above this version's limit of 1024 transitions"),
    # The model checks columns and cells itself (its signature has no input schema, whose enforcement would drop
    # an unknown column with a 200 and refuse a null without naming the row).
    (["num_images", "seed"], [[1, 2]], "column 'label' is required"),
    (["label", "colour"], [[1, "red"]], "unknown column(s) 'colour'"),
    (["label", "nfe"], [[1, 2], [0, None]], "row 1: column 'nfe' is null"),
    (["label", "nfe"], [[1, "four"]], "row 0: column 'nfe' must be an integer; got 'four'"),
]


@pytest.fixture(scope="module")
def champion(sqlite_store, tmp_path_factory):
    """A registered tiny model promoted by `tim promote` (CLI), and params.yaml pointing at its store."""
    name = "tim-served"
    version = sqlite_store.version(name, GOOD)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["registry"]["model_name"] = name
    params["mlflow"]["tracking_uri"] = sqlite_store.uri
    params["registry"]["lock"]["settle_s"] = 0.2
    path = tmp_path_factory.mktemp("cli") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = path.parent / "decision.json"
    res = tim("promote", "--params", path, "--version", version, "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"{name} version {version}: PROMOTED" in res.stdout and "mlflow ui --backend-store-uri" in res.stdout
    assert "champion: version 1 (NFE 1: fid 40, NFE 4: fid 20)" in res.stdout and out.is_file()
    return sqlite_store, name, path


def tim(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tim"), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kw)


def test_tim_generate_uses_the_recommended_nfe(champion, tmp_path):
    _, name, params = champion
    res = tim("generate", "--params", params, "--model", f"models:/{name}@champion", "--label", "2",
              "--num-images", "3", "--out", tmp_path / "grid.png")
    assert res.returncode == 0, res.stderr
    assert "recommended NFE: 4" in res.stdout and "at NFE 4" in res.stdout
    assert Image.open(tmp_path / "grid.png").size == (3 * SIZE, SIZE)


def test_cli_bad_input_exits_2_an_unreachable_store_and_a_held_lease_75(champion, tmp_path):
    """Three `tim` processes at once (each pays the imports once, in parallel): a dangling alias (2), an
    unreachable registry (75), and a promotion that finds the lease held by another live promotion (75, naming
    the holder and the lease tag). The lease is written beforehand, as a live holder leaves it: no race."""
    store, name, params = champion
    unreachable, contended = tmp_path / "params.yaml", tmp_path / "contended.yaml"
    config = yaml.safe_load(params.read_text())
    config["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    unreachable.write_text(yaml.safe_dump(config))
    config = yaml.safe_load(params.read_text())
    config["registry"]["lock"]["wait_s"] = 1
    contended.write_text(yaml.safe_dump(config))
    holder = "other-host:4242:deadbeef"
    lease = json.dumps({"owner": holder, "expires": time.time() + 600})
    client = store.client()
    client.set_registered_model_tag(name, LEASE_TAG, lease)
    runs = {
        "alias": [str(BIN / "tim"), "generate", "--params", str(params), "--model", f"models:/{name}@nowhere",
                  "--label", "1", "--out", str(tmp_path / "x.png")],
        "registry": [str(BIN / "tim"), "rollback", "--params", str(unreachable), "--out", str(tmp_path / "r.json")],
        "lease": [str(BIN / "tim"), "promote", "--params", str(contended), "--version", "1", "--out",
                  str(tmp_path / "d.json")],
    }
    try:
        procs = {k: subprocess.Popen(v, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, v in runs.items()}
        results = {k: (p.wait(timeout=120), p.stderr.read()) for k, p in procs.items()}
        tag = client.get_registered_model(name).tags.get(LEASE_TAG)
    finally:
        client.delete_registered_model_tag(name, LEASE_TAG)
    assert results["alias"][0] == 2 and "error: models:/tim-served@nowhere" in results["alias"][1]
    assert results["registry"][0] == 75 and "unreachable" in results["registry"][1]  # retryable
    code, stderr = results["lease"]
    assert code == 75, stderr
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and holder in error[0] and LEASE_TAG in error[0] and "after waiting 1 s" in error[0], stderr
    assert "Traceback" not in results["alias"][1] + results["registry"][1] + stderr
    assert not any((tmp_path / f).exists() for f in ("x.png", "r.json", "d.json"))
    assert tag == lease  # the live holder's lease is left as it was


def test_mlflow_models_serve_answers_with_images(champion, tmp_path):
    store, name, _ = champion
    port = free_port()
    # The scoring server is `uvicorn` from this environment: as in an activated venv, its bin comes first.
    env = dict(os.environ, MLFLOW_TRACKING_URI=store.uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"),
                              start_new_session=True)  # its own group: stopping it stops the uvicorn it runs
    url = f"http://127.0.0.1:{port}"
    try:
        for attempt in Retrying(stop=stop_after_delay(120), wait=wait_fixed(0.5), reraise=True,
                                retry=retry_if_exception_type(requests.ConnectionError)):
            with attempt:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                requests.get(f"{url}/ping", timeout=2).raise_for_status()
        body = {"dataframe_split": {"columns": ["label", "num_images", "nfe", "seed"], "data": [[1, 2, 2, 7]]}}
        response = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert [(r["label"], r["nfe"], r["network_evals"]) for r in rows] == [(1, 2, 2), (1, 2, 2)]
        image = Image.open(io.BytesIO(base64.b64decode(rows[0]["image"])))
        assert image.size == (SIZE, SIZE) and image.mode == "L"
        # Every kind of bad request is the client's fault (400) and says which row or column is wrong.
        for columns, data, expected in BAD_REQUESTS:
            bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": columns, "data": data}},
                                timeout=60)
            assert bad.status_code == 400, (columns, data, bad.status_code, bad.text)
            assert expected in bad.json()["message"], (expected, bad.text)
        # The same seed gives the same PNG bytes, request after request; another seed does not.
        same = {"dataframe_split": {"columns": ["label", "num_images", "nfe", "seed"], "data": [[2, 2, 3, 11]]}}
        first, second = (requests.post(f"{url}/invocations", json=same, timeout=60).json()["predictions"]
                         for _ in range(2))
        assert [r["image"] for r in first] == [r["image"] for r in second]
        assert first[0]["image"] != first[1]["image"]  # two draws of one request differ
        other = {"dataframe_split": {"columns": ["label", "num_images", "nfe", "seed"], "data": [[2, 2, 3, 12]]}}
        assert requests.post(f"{url}/invocations", json=other, timeout=60).json()["predictions"][0]["image"] != \
            first[0]["image"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
