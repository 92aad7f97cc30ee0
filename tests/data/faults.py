"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server: the first ``fail`` GETs of each
object either get ``503 SlowDown`` (S3's throttling answer) or have their connection dropped without an answer;
everything else is relayed to moto unchanged. Counting per object makes the faults deterministic whatever the
order in which a thread pool reads the objects."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyProxy:
    def __init__(self, upstream: str, fail: int, kind: str, match: str = ""):
        if kind not in ("slowdown", "drop"):
            raise ValueError(kind)
        self.upstream, self.fail, self.kind, self.match = urlsplit(upstream), fail, kind, match
        self.gets: Counter[str] = Counter()   # object GETs seen, per path
        self.faults = 0
        self.lock = threading.Lock()

    def is_object_get(self, method: str, path: str) -> bool:
        # list_objects_v2 is GET /bucket?list-type=2; an object is GET /bucket/key (no query).
        parts = urlsplit(path)
        return method == "GET" and not parts.query and parts.path.count("/") >= 2 and self.match in parts.path

    def should_fault(self, method: str, path: str) -> bool:
        if not self.is_object_get(method, path):
            return False
        with self.lock:
            self.gets[path] += 1
            fault = self.gets[path] <= self.fail
            self.faults += fault
            return fault


def _handler(proxy: FaultyProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def relay(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if proxy.should_fault(self.command, self.path):
                if proxy.kind == "drop":  # close without a byte of answer
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                up.request(self.command, self.path, body=body or None, headers=headers)
                res = up.getresponse()
                data = res.read()
            finally:
                up.close()
            self.send_response(res.status, res.reason)
            for k, v in res.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

    return Handler


@contextlib.contextmanager
def faulty_proxy(upstream: str, fail: int, kind: str, match: str = "") -> Iterator[tuple[str, FaultyProxy]]:
    """Start the proxy (it binds port 0 itself: no race for a port) and yield its URL; always stopped."""
    proxy = FaultyProxy(upstream, fail, kind, match)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
