"""The public AEF COG tile index: downloaded once, cached, queried by area and year.

The mirror answers Python's default urllib User-Agent with 403, so every request
carries our own ("alphaearth-height/<version>"). The download is validated before it is
cached (an HTML page answered with status 200 must not become "the index") and again
when a cached copy is reused; it has a stall timeout and a deadline (core.fetch.network).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import importlib.metadata
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from ..errors import InputError
from ..inference import CancelFn
from ..rasters import Grid
from .network import (DEFAULT_INDEX_DEADLINE, DEFAULT_STALL, Deadline, DeadlineExceeded, NetworkError, StatusFn,
                      download_file, log_status)
from .retry import GaveUp, with_retries

DEFAULT_BASE_URL = "https://data.source.coop/tge-labs/aef/v1/annual"
INDEX_NAME = "aef_index.csv"
REQUIRED_COLUMNS = ("path", "crs", "year", "utm_west", "utm_south", "utm_east", "utm_north",
                    "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
_MARKER = "v1/annual/"


def user_agent() -> str:
    """alphaearth-height/<version>, from the installed package or the plugin's metadata.txt."""
    try:
        version = importlib.metadata.version("alphaearth-height")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
        metadata = Path(__file__).resolve().parents[3] / "metadata.txt"
        if metadata.is_file():
            for line in metadata.read_text(encoding="utf-8").splitlines():
                if line.startswith("version="):
                    version = line.split("=", 1)[1].strip()
    return f"alphaearth-height/{version}"


@dataclass(frozen=True)
class IndexEntry:
    """One COG: where it is, its CRS and its footprint in that CRS."""

    url: str
    crs: CRS
    bounds: tuple[float, float, float, float]


def tile_url(path: str, base_url: str) -> str:
    """Map an index ``path`` (s3://..., relative, or http) onto the configured mirror."""
    path = path.strip()
    if _MARKER in path:
        url = base_url.rstrip("/") + "/" + path.split(_MARKER, 1)[1]
    elif path.startswith(("http://", "https://")):
        url = path
    else:
        url = base_url.rstrip("/") + "/" + path.lstrip("/")
    return url[:-4] + ".tiff" if url.endswith(".vrt") else url


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    if isinstance(exc, DeadlineExceeded):
        return False
    return isinstance(exc, (NetworkError, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                            TimeoutError))


def _header(path: Path) -> list[str]:
    """The CSV header of ``path`` (its first line, read up to 64 KB)."""
    with open(path, "rb") as handle:
        first = handle.readline(65536)
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        return []
    return next(csv.reader([text]), [])


def _last_line(path: Path) -> bytes:
    """The last line of ``path`` (up to 64 KB), without its line ending."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 65536))
        lines = handle.read().rstrip(b"\r\n").splitlines()
    return lines[-1] if lines else b""


def index_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a usable AEF tile index (None when it is).

    Checked before a download is cached and again when a cached copy is reused: the CSV
    header must hold the index's columns, and the last row must be complete (as many
    fields as the header), so an HTML error page or a cut-off file is never used.
    """
    header = _header(path)
    if not header:
        return "is empty" if path.stat().st_size == 0 else "is not a CSV file"
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        start = " ".join(",".join(header)[:60].split())
        return f"is not an AEF tile index (no {', '.join(missing[:3])} column; it starts {start!r})"
    try:
        fields = next(csv.reader([_last_line(path).decode("utf-8")]), [])
    except UnicodeDecodeError:
        fields = []
    if fields == header:
        return "has no rows"
    if len(fields) != len(header):
        return f"ends with an incomplete row ({len(fields)} of {len(header)} fields)"
    return None


def _check_download(url: str, path: Path, content_type: str) -> None:
    """Refuse (without caching) an index that is not one; a permanent error, not retried."""
    problem = index_problem(path)
    if problem is None:
        return
    with open(path, "rb") as handle:
        start = handle.read(4096).lower()
    if content_type == "text/html" or b"<html" in start or b"<!doctype html" in start:
        problem = f"answered an HTML page (status 200, {content_type}), not the AEF tile index CSV"
    raise InputError(url, problem, "Check the COG base URL, and any proxy or captive portal (open the URL "
                     "in a browser); nothing was cached, so the next run downloads it again")


def index_path(base_url: str, cache_root: Path) -> Path:
    """Where the index of the mirror at ``base_url`` is cached."""
    key = hashlib.sha1(base_url.rstrip("/").encode()).hexdigest()[:12]
    return cache_root / "cog" / "index" / f"{key}_{INDEX_NAME}"


def cached_index(base_url: str, cache_root: Path, *, cancel: Optional[CancelFn] = None, retries: int = 5,
                 retry_delay: float = 1.0, stall: float = DEFAULT_STALL,
                 deadline: float = DEFAULT_INDEX_DEADLINE, status: Optional[StatusFn] = None) -> Path:
    """Path of the mirror's index CSV, downloaded (atomically, validated) on first use.

    A cached copy that is not a valid index (cut off, or an error page an older version
    stored) is deleted and downloaded again. The download says what it waits for through
    ``status``, gives up on a stall after ``stall`` s and after ``deadline`` s in all.
    """
    target = index_path(base_url, cache_root)
    say = status or log_status
    if target.is_file():
        problem = index_problem(target)
        if problem is None:
            return target
        say(f"the cached tile index {target} {problem}: downloading it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    url = base_url.rstrip("/") + "/" + INDEX_NAME
    what = ("the COG tile index (~800 MB, downloaded once and cached)" if base_url.rstrip("/") == DEFAULT_BASE_URL
            else "the COG tile index")
    limit = Deadline(deadline, what)
    seen: list[BaseException] = []  # the failures retried so far

    def retrying(exc: BaseException, delay: float, attempt: int) -> None:
        seen.append(exc)
        say(f"{_reason(exc)}; trying again in {delay:.0f} s (attempt {attempt + 1} of {retries})")

    try:
        with_retries(lambda: download_file(url, target, what=what, stall=stall, deadline=limit, cancel=cancel,
                                           status=say, headers={"User-Agent": user_agent()},
                                           validate=lambda path, kind: _check_download(url, path, kind)),
                     transient=_transient, attempts=retries, base_delay=retry_delay, cancel=cancel,
                     deadline=limit, on_retry=retrying)
    except GaveUp as exc:
        raise _download_error(url, exc.last, f"; gave up within the {deadline:g} s deadline after "
                                             f"{exc.attempts} attempt(s)") from None
    except DeadlineExceeded as exc:  # the deadline cut an attempt: say what the earlier ones met
        if not seen:
            raise _download_error(url, exc, "") from None
        raise _download_error(url, seen[-1], f"; gave up within the {deadline:g} s deadline after "
                                             f"{len(seen) + 1} attempt(s)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, NetworkError) as exc:
        tail = f"; {len(seen) + 1} attempt(s)" if seen else ""
        raise _download_error(url, exc, tail) from None
    return target


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}".strip()
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _download_error(url: str, exc: BaseException, tail: str) -> InputError:
    if isinstance(exc, urllib.error.HTTPError) and not _transient(exc):
        return InputError(url, f"was refused by the server (HTTP {exc.code}){tail}",
                          "Check the COG base URL (default " + DEFAULT_BASE_URL + ")")
    if isinstance(exc, OSError) and not isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return InputError(url, f"could not be saved in the cache ({exc})",
                          "Check the cache folder (--cache-dir) and its free space")
    return InputError(url, f"could not be downloaded ({_reason(exc)}{tail})",
                      "Check the internet connection (or proxy) and the COG base URL, then run again")


def _crs(value: str) -> CRS:
    value = value.strip()
    return CRS.from_epsg(int(value)) if value.isdigit() else CRS.from_user_input(value)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and a[2] > b[0] and a[1] < b[3] and a[3] > b[1]


def select_entries(index: Path, base_url: str, year: int, grid: Grid) -> list[IndexEntry]:
    """Index rows of ``year`` whose footprint meets the grid, each tested in its own CRS."""
    lon_lat = transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21)
    in_crs: dict[str, tuple[float, float, float, float]] = {}
    entries = []
    csv.field_size_limit(sys.maxsize)  # footprint WKT fields can be long
    with open(index, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(index, f"is not an AEF tile index (missing columns {', '.join(missing)})",
                             "Delete it (clear the cache) so it is downloaded again, or check the base URL")
        for row in reader:
            if row["year"].strip() != str(year):
                continue
            wgs84 = tuple(float(row[f"wgs84_{s}"]) for s in ("west", "south", "east", "north"))
            if not _overlaps(wgs84, lon_lat):
                continue
            if row["crs"] not in in_crs:
                in_crs[row["crs"]] = transform_bounds(grid.crs, _crs(row["crs"]), *grid.bounds, densify_pts=21)
            utm = tuple(float(row[f"utm_{s}"]) for s in ("west", "south", "east", "north"))
            if _overlaps(utm, in_crs[row["crs"]]):
                entries.append(IndexEntry(tile_url(row["path"], base_url), _crs(row["crs"]), utm))
    return entries
