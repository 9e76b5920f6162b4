"""A real HTTP server on 127.0.0.1 for the COG fetcher's tests, and the mirror it serves.

It behaves like the public AEF mirror where it matters: byte ranges (206), HEAD,
a 403 for Python's default urllib User-Agent, and, on request, a connection dropped
mid-transfer once. It counts the requests and body bytes it served.

``faults`` make it misbehave on chosen paths, the way real servers and proxies do: stay
silent after accepting the request, trickle a byte every few seconds, answer an HTML
page with status 200, or answer an HTTP status (503, 403) for the first N requests.
Every such loop is bounded: it ends when the server stops or its ``lifetime`` is over,
whichever comes first, and the server shuts itself down when its lifetime is over.

The fixture COGs are written like the public ones: int8, 64 bands A00..A63, nodata
-128, stored bottom-up (positive y pixel size), internally tiled with overviews. The
core, Processing and dock tests all fetch from the same ``build_mirror``.
"""

from __future__ import annotations

import csv
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.shutil import copy as copy_raster
from rasterio.warp import transform as transform_points

from alphaearth_height.plugin.core import aef

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


@dataclass
class Fault:
    """Misbehave on requests whose path ends with ``suffix``.

    kind: "silent" (read the request, never answer), "trickle" (200 and headers promising
    1 MB, then one byte every ``interval`` s), "html" (200 with an HTML error page, as a
    captive portal or a misconfigured proxy answers), "cut" (the file's headers and half
    its body, then the connection closes), or "status" (answer ``status`` with an empty body). ``times``: how many requests get the fault (None: all of them).
    """

    suffix: str
    kind: str
    status: int = 503
    interval: float = 5.0
    times: Optional[int] = None
    ranged: Optional[bool] = None  # only requests with (True) or without (False) a Range header; None: all
    hits: int = 0


HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Service notice</title></head>\n"
             b"<body><h1>Sign in to continue</h1><p>This network requires you to log in.</p></body></html>\n")


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, faults: Sequence[Fault] = (), lifetime: float = 300.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log = ServerLog()
        self.drops_left = 0  # ranged GETs of .tiff files to cut off half-way
        self.no_ranges: tuple[str, ...] = ()  # path suffixes answered whole (200), Range ignored, like some proxies
        self.faults = list(faults)
        self.lifetime = lifetime
        self.stopping = threading.Event()  # set when the server stops: ends silent and trickling answers
        self.thread = threading.Thread(target=self._serve_for_lifetime, daemon=True)

    def _serve_for_lifetime(self) -> None:
        timer = threading.Timer(self.lifetime, self._expire)
        timer.daemon = True
        timer.start()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            timer.cancel()

    def _expire(self) -> None:
        """End of lifetime: stop the slow answers and the serving loop (from the timer's thread)."""
        self.stopping.set()
        self.shutdown()

    def fault_for(self, path: str, ranged: bool = False) -> Optional[Fault]:
        with self.log.lock:
            for fault in self.faults:
                if fault.ranged is not None and fault.ranged != ranged:
                    continue
                if path.split("?")[0].endswith(fault.suffix) and (fault.times is None or fault.hits < fault.times):
                    fault.hits += 1
                    return fault
        return None

    def ignores_range(self, path: str) -> bool:
        return bool(self.no_ranges) and path.split("?")[0].endswith(self.no_ranges)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "RangeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.thread.is_alive():
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
        fault = self.server.fault_for(self.path, ranged=bool(rng))
        if fault is not None:
            self._misbehave(fault, body)
            return
        path = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        if not path.is_file() or self.server.root.resolve() not in path.parents:
            self._empty(404)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        if rng and not self.server.ignores_range(self.path):
            match = _RANGE.match(rng.strip())
            if not match:
                self._empty(416)
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if start >= size:
                self._empty(416)
                return
            status = 206
        with open(path, "rb") as handle:  # only the range asked (tiles and indexes are large)
            handle.seek(start)
            chunk = handle.read(end + 1 - start)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
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
        try:
            self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on the rest (a cancel, a retry)
            self.close_connection = True
            return
        log.served(self.path, len(chunk))

    def _misbehave(self, fault: Fault, body: bool) -> None:
        stopping, lifetime = self.server.stopping, self.server.lifetime
        if fault.kind == "silent":
            stopping.wait(lifetime)  # the request was read; no answer until the server stops
            self.close_connection = True
        elif fault.kind == "trickle":
            match = _RANGE.match((self.headers.get("Range") or "").strip())
            if match:  # a ranged read: 206 for the range asked (of a 1 GB file)
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else start + (1 << 20) - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{1 << 30}")
                self.send_header("Content-Length", str(end - start + 1))
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
            for _ in range(int(lifetime / fault.interval) + 1):  # one byte per interval, until the server stops
                if not body or stopping.wait(fault.interval):
                    break
                try:
                    self.wfile.write(b"W")
                    self.wfile.flush()
                except OSError:  # the client gave up
                    break
            self.close_connection = True
        elif fault.kind == "html":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(HTML_PAGE)))
            self.end_headers()
            if body:
                self.wfile.write(HTML_PAGE)
        elif fault.kind == "cut":
            data = (self.server.root / self.path.split("?")[0].lstrip("/")).read_bytes()
            match = _RANGE.match((self.headers.get("Range") or "").strip())
            if match:  # a ranged read cut off: 206 promising the range, half of it sent
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                data = data[start:end + 1]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.server.log.served(self.path, len(data) // 2)
            self.close_connection = True
        elif fault.kind == "status":
            self._empty(fault.status)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")

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


SIZE = 512
PREFIX = "tge-labs/aef/v1/annual"
S3 = "s3://us-west-2.opendata.source.coop/" + PREFIX
COLUMNS = ["WKT", "crs", "year", "utm_zone", "utm_west", "utm_south", "utm_east", "utm_north",
           "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north", "path"]


def smooth_field(seed: int) -> np.ndarray:
    """North-up unit-length embeddings (64, SIZE, SIZE), quantised like AEF."""
    k = np.arange(64, dtype=np.float32)[:, None, None]
    x = np.arange(SIZE, dtype=np.float32)[None, None, :]
    y = np.arange(SIZE, dtype=np.float32)[None, :, None]
    a, b = 0.02 * (k % 7 + 1) * x, 0.015 * (k % 3 + 1) * y + k * seed
    v = np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)  # cos(a + b), separably
    return aef.quantise(v / np.linalg.norm(v, axis=0, keepdims=True))


class Cog:
    def __init__(self, root: Path, year: int, epsg: int, left: float, bottom: float, seed: int, name: str) -> None:
        self.crs = CRS.from_epsg(epsg)
        self.left, self.bottom, self.top = left, bottom, bottom + SIZE * 10
        self.truth = smooth_field(seed)  # north-up, int8
        if seed == 1:
            self.truth[:, 300:310, 100:140] = aef.NODATA_INT8  # a nodata hole (all bands)
        zone = f"{epsg - 32600}N"
        self.rel = f"{year}/{zone}/{name}-0000000000-0000000000.tiff"
        self.path = root / PREFIX / self.rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        bottom_up = Affine(10, 0, left, 0, 10, bottom)
        profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "count": 64, "dtype": "int8",
                   "crs": self.crs, "transform": bottom_up, "nodata": aef.NODATA_INT8}
        with rasterio.MemoryFile() as mem:
            with mem.open(**profile) as ds:
                ds.write(self.truth[:, ::-1, :])
                for i, band in enumerate(aef.BAND_NAMES, start=1):
                    ds.set_band_description(i, band)
            with mem.open() as ds:
                copy_raster(ds, self.path, driver="COG", BLOCKSIZE=128, COMPRESS="DEFLATE", PREDICTOR="YES",
                            OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="NEAREST")
        self.row = self._row(year, zone)

    def _row(self, year: int, zone: str) -> dict:
        xs = [self.left, self.left + SIZE * 10]
        ys = [self.bottom, self.top]
        lon, lat = transform_points(self.crs, "EPSG:4326", [xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
        ring = ", ".join(f"{a} {b}" for a, b in zip(lon + lon[:1], lat + lat[:1]))
        return {"WKT": f"POLYGON (({ring}))", "crs": f"EPSG:{self.crs.to_epsg()}", "year": year, "utm_zone": zone,
                "utm_west": xs[0], "utm_south": ys[0], "utm_east": xs[1], "utm_north": ys[1],
                "wgs84_west": min(lon), "wgs84_south": min(lat), "wgs84_east": max(lon), "wgs84_north": max(lat),
                "path": f"{S3}/{self.rel}"}

    def value_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest truth (64, n) at points in this COG's CRS and whether each has data."""
        c = np.floor((x - self.left) / 10).astype(int)
        r = np.floor((self.top - y) / 10).astype(int)
        inside = (c >= 0) & (c < SIZE) & (r >= 0) & (r < SIZE)
        values = np.full((64, x.size), aef.NODATA_INT8, dtype=np.int8)
        values[:, inside] = self.truth[:, r[inside], c[inside]]
        return values, values[0] != aef.NODATA_INT8


def snap10(v: float) -> float:
    """Down to a multiple of 10 m (the output grid's pixel edges)."""
    return float(np.floor(v / 10) * 10)


def build_mirror(root: Path) -> dict[str, Cog]:
    """A small AEF mirror under ``root``: COGs either side of the UTM 30/31 boundary at 0°
    longitude (45° N), one far away, one for 2021, and the CSV tile index listing them."""
    (x30,), (y30,) = transform_points("EPSG:4326", "EPSG:32630", [0.0], [45.01])
    (x31,), (y31,) = transform_points("EPSG:4326", "EPSG:32631", [0.0], [45.01])
    cogs = {
        # zone 30 tile overhangs 0° by ~1 km, with a nodata hole inside
        "w": Cog(root, 2020, 32630, snap10(x30) - 4120, snap10(y30) - 2560, 1, "xw30"),
        "e": Cog(root, 2020, 32631, snap10(x31) - 1000, snap10(y31) - 2570, 2, "xe31"),
        "far": Cog(root, 2020, 32630, 500_000.0, 4_000_000.0, 3, "xfar"),
        "w2021": Cog(root, 2021, 32630, snap10(x30) - 4120, snap10(y30) - 2560, 4, "xw30b"),
    }
    index = root / PREFIX / "aef_index.csv"
    with open(index, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for cog in cogs.values():
            writer.writerow(cog.row)
    return cogs


def expected_output(grid, cogs: list[Cog]) -> np.ndarray:
    """Per pixel: the first COG (in order) with data under the pixel centre, nearest."""
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    out = np.full((64, xs.size), aef.NODATA_INT8, dtype=np.int8)
    filled = np.zeros(xs.size, dtype=bool)
    for cog in cogs:
        px, py = (np.asarray(v) for v in transform_points(grid.crs, cog.crs, xs, ys))
        values, ok = cog.value_at(px, py)
        take = ok & ~filled
        out[:, take] = values[:, take]
        filled |= take
    return out.reshape(64, grid.height, grid.width)
