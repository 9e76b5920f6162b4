"""A real HTTP server on 127.0.0.1 for the COG fetcher's tests.

It behaves like the public AEF mirror where it matters: byte ranges (206), HEAD,
a 403 for Python's default urllib User-Agent, and, on request, a connection dropped
mid-transfer once. It counts the requests and body bytes it served.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class ServerLog:
    requests: list[tuple[str, str, Optional[str], str]] = field(default_factory=list)  # method, path, range, UA
    bytes_served: dict[str, int] = field(default_factory=dict)
    drops: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, path: str, count: int) -> None:
        with self.lock:
            self.bytes_served[path] = self.bytes_served.get(path, 0) + count


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log = ServerLog()
        self.drops_left = 0  # ranged GETs of .tiff files to cut off half-way
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "RangeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: RangeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        agent = self.headers.get("User-Agent", "")
        rng = self.headers.get("Range")
        log = self.server.log
        with log.lock:
            log.requests.append((self.command, self.path, rng, agent))
        if agent.startswith("Python-urllib"):
            self._empty(403)
            return
        path = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        if not path.is_file() or self.server.root.resolve() not in path.parents:
            self._empty(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        if rng:
            match = _RANGE.match(rng.strip())
            if not match:
                self._empty(416)
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self._empty(416)
                return
            status = 206
        chunk = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if status == 206 and self.path.endswith(".tiff") and self._take_drop():
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            log.served(self.path, len(chunk) // 2)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(chunk)
        log.served(self.path, len(chunk))

    def _take_drop(self) -> bool:
        log = self.server.log
        with log.lock:
            if self.server.drops_left > 0:
                self.server.drops_left -= 1
                log.drops += 1
                return True
        return False

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
