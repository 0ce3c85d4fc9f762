"""A loopback fake of the Hugging Face Hub: a real HTTP server on 127.0.0.1
serving files a test made, with the Hub's API answer for one repo revision and
switches for misbehaviour (404, 503, dropped connections, wrong bytes)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    """State shared between a test and the loopback server's request handler.

    ``files`` maps name -> bytes; names in ``lfs`` are advertised as LFS files
    (verified by sha256), the rest as plain git blobs (verified by blob sha1).
    Per-file misbehaviour is switched on through the sets/dicts below.
    """

    def __init__(self, repo: str, revision: str, commit: str = "f" * 40) -> None:
        self.repo, self.revision, self.commit = repo, revision, commit
        self.files: dict[str, bytes] = {}
        self.lfs: set[str] = set()
        self.not_found: set[str] = set()
        self.fail_once_503: set[str] = set()
        self.drop_after_first: dict[str, int] = {}  # name -> bytes sent before closing
        self.served_instead: dict[str, bytes] = {}  # name -> bytes that differ from the API's hash
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) in arrival order
        self.url = ""

    def add(self, name: str, data: bytes, lfs: bool = False) -> None:
        self.files[name] = data
        if lfs:
            self.lfs.add(name)

    def file_requests(self, name: str) -> list[dict[str, str]]:
        """Headers of every request for the file ``name``."""
        suffix = f"/resolve/{self.revision}/{name}"
        return [headers for path, headers in self.requests if path.endswith(suffix)]

    def api_json(self) -> dict:
        siblings = []
        for name, data in self.files.items():
            sibling = {
                "rfilename": name,
                "size": len(data),
                "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
            if name in self.lfs:
                # For LFS files the git blob is the pointer file, not the content.
                sibling["blobId"] = "0" * 40
                sibling["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 130,
                }
            siblings.append(sibling)
        return {"id": self.repo, "sha": self.commit, "siblings": siblings}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            hub.requests.append((self.path, dict(self.headers)))
            path = unquote(urlsplit(self.path).path)
            if path == f"/api/models/{hub.repo}/revision/{hub.revision}":
                self._send(200, json.dumps(hub.api_json()).encode(), {"Content-Type": "application/json"})
                return
            prefix = f"/{hub.repo}/resolve/{hub.revision}/"
            name = path[len(prefix):] if path.startswith(prefix) else None
            if name is None or name not in hub.files or name in hub.not_found:
                self._send(404, b"Entry not found")
                return
            if name in hub.fail_once_503:
                hub.fail_once_503.discard(name)
                self._send(503, b"Service Unavailable")
                return
            self._send_file(name, hub.served_instead.get(name, hub.files[name]))

        def _send_file(self, name: str, data: bytes) -> None:
            start = 0
            range_header = self.headers.get("Range")
            if range_header:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
            body = data[start:]
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in hub.drop_after_first:
                # Promise the full length, send part of it, then hang up.
                self.wfile.write(body[: hub.drop_after_first.pop(name)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve(hub: FakeHub):
    """Run the fake hub on a free loopback port; `hub.url` is its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub))
    server.daemon_threads = True
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
