"""Real HTTP servers for tests: a ``ThreadingHTTPServer`` on 127.0.0.1 with routes, a file server with fault
injection (failures, cut connections, Range), redirects, and just enough of the Hugging Face Hub API."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeServer:
    """A ``ThreadingHTTPServer`` on an ephemeral port that routes paths to callables and logs requests."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.command, self.path, dict(self.headers)))
                route = outer.routes.get(urlsplit(self.path).path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def gets(self, path: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and urlsplit(p).path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Blob:
    """Serves ``data``; optionally fails first with given statuses, cuts the first body, honours Range."""

    def __init__(
        self,
        data: bytes,
        *,
        ranges: bool = True,
        fail_first: tuple[int, ...] = (),
        cut_first_at: int | None = None,
        chunk_delay: float = 0.0,
    ) -> None:
        self.data, self.ranges, self.chunk_delay = data, ranges, chunk_delay
        self.fail = list(fail_first)
        self.cut_at = cut_first_at
        self.lock = threading.Lock()

    def __call__(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            status = self.fail.pop(0) if self.fail else None
            cut_at, self.cut_at = self.cut_at, None
        if status is not None:
            h.send_error(status)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if self.ranges and m:
            start = int(m[1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        else:
            h.send_response(200)
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        body = self.data[start:]
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", '"v1"')
        h.end_headers()
        if h.command == "HEAD":
            return
        if cut_at is not None:  # promise the whole body, send part of it, hang up
            h.wfile.write(body[:cut_at])
            h.wfile.flush()
            h.close_connection = True
            return
        for i in range(0, len(body), 64 << 10):
            h.wfile.write(body[i : i + (64 << 10)])
            if self.chunk_delay:
                time.sleep(self.chunk_delay)


def redirect_to(location: str, status: int = 302) -> Callable[[BaseHTTPRequestHandler], None]:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def fake_hub(server: FakeServer, files: dict[str, bytes], repo: str = "ntt/m2d2-test", commit: str = COMMIT) -> None:
    """Just enough of the Hub API for ``hf_hub_download`` and ``snapshot_download``."""

    def send_json(h: BaseHTTPRequestHandler, obj: object) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
    tree = [{"type": "file", "path": f, "size": len(d), "oid": oid(d)} for f, d in files.items()]
    for rev in ("main", commit):
        server.routes[f"/api/models/{repo}/revision/{rev}"] = lambda h: send_json(h, info)
        server.routes[f"/api/models/{repo}/tree/{rev}"] = lambda h: send_json(h, tree)
        for name, data in files.items():

            def resolve(h: BaseHTTPRequestHandler, data: bytes = data) -> None:
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.send_header("ETag", f'"{oid(data)}"')
                h.send_header("X-Repo-Commit", commit)
                h.end_headers()
                if h.command == "GET":
                    h.wfile.write(data)

            server.routes[f"/{repo}/resolve/{rev}/{name}"] = resolve
