"""A stand-in for the Kubeflow Pipelines REST API (v2beta1) on 127.0.0.1 that records every request and keeps
just enough state (pipelines, versions, experiments, recurring runs) to answer the calls `tim pipeline submit |
schedule | unschedule` make. No KFP backend runs on these machines: what the tests check is what is sent."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class State:
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, str] = field(default_factory=dict)          # name -> id
    versions: dict[str, list[dict]] = field(default_factory=dict)    # pipeline id -> versions, newest last
    experiments: dict[str, str] = field(default_factory=dict)        # name -> id
    recurring: dict[str, dict] = field(default_factory=dict)         # id -> body
    fail_with: int | None = None                                     # answer every API call with this status

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]


def _files(body: bytes, content_type: str) -> dict[str, bytes]:
    message = BytesParser(policy=policy.default).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            ctype = self.headers.get("Content-Type", "")
            request = Request(self.command, url.path, {k: v[0] for k, v in parse_qs(url.query).items()},
                              {k.lower(): v for k, v in self.headers.items()})
            if ctype.startswith("multipart/"):
                request.files = _files(body, ctype)
            elif body:
                request.json = json.loads(body)
            state.requests.append(request)
            if state.fail_with and url.path != f"{API}/healthz":
                return self._answer(state.fail_with, {"error": "refused by the test server"})
            self._answer(200, self._route(request))

        def _route(self, r: Request) -> Any:
            path, q = r.path, r.query
            if path == f"{API}/healthz":
                return {"multi_user": False}
            if r.method == "GET" and path == f"{API}/pipelines":
                name = json.loads(q.get("filter", "{}"))["predicates"][0]["stringValue"]
                pid = state.pipelines.get(name)
                return {"pipelines": [{"pipeline_id": pid, "display_name": name}], "total_size": 1} if pid else {}
            if path == f"{API}/pipelines/upload":
                pid = f"p{len(state.pipelines) + 1}"
                state.pipelines[q["name"]] = pid
                state.versions[pid] = [{"pipeline_id": pid, "pipeline_version_id": f"{pid}-v1",
                                        "display_name": q["name"]}]
                return {"pipeline_id": pid, "display_name": q["name"]}
            if path == f"{API}/pipelines/upload_version":
                pid = q["pipelineid"]
                made = {"pipeline_id": pid, "pipeline_version_id": f"{pid}-v{len(state.versions[pid]) + 1}",
                        "display_name": q["name"]}
                state.versions[pid].append(made)
                return made
            match = re.fullmatch(rf"{API}/pipelines/([\w-]+)/versions", path)
            if r.method == "GET" and match:
                return {"pipeline_versions": list(reversed(state.versions[match.group(1)])), "total_size": 1}
            if r.method == "GET" and path == f"{API}/experiments":
                name = json.loads(q.get("filter", "{}"))["predicates"][0]["stringValue"]
                eid = state.experiments.get(name)
                return {"experiments": [{"experiment_id": eid, "display_name": name}], "total_size": 1} if eid else {}
            if r.method == "POST" and path == f"{API}/experiments":
                eid = f"e{len(state.experiments) + 1}"
                state.experiments[r.json["display_name"]] = eid
                return {"experiment_id": eid, "display_name": r.json["display_name"]}
            if r.method == "POST" and path == f"{API}/runs":
                return {**r.json, "run_id": f"r{len(state.sent('POST', f'{API}/runs'))}"}
            if r.method == "POST" and path == f"{API}/recurringruns":
                rid = f"rr{len(state.sent('POST', f'{API}/recurringruns'))}"
                state.recurring[rid] = r.json
                return {**r.json, "recurring_run_id": rid}
            if r.method == "GET" and path == f"{API}/recurringruns":
                runs = [{**body, "recurring_run_id": rid} for rid, body in state.recurring.items()
                        if body["experiment_id"] == q.get("experiment_id")]
                return {"recurringRuns": runs, "total_size": len(runs)} if runs else {}  # the API's JSON name
            match = re.fullmatch(rf"{API}/recurringruns/([\w-]+)", path)
            if r.method == "DELETE" and match:
                state.recurring.pop(match.group(1), None)
                return {}
            raise AssertionError(f"the test server does not know {r.method} {path}")

        do_GET = do_POST = do_DELETE = _handle

    return Handler


@contextlib.contextmanager
def kfp_server() -> Iterator[tuple[str, State]]:
    """(its URL, what it saw); stopped when the block ends."""
    state = State()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
