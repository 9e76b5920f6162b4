"""The public AEF COG tile index: downloaded once, cached, queried by area and year.

The mirror answers Python's default urllib User-Agent with 403, so every request
carries our own ("alphaearth-height/<version>").
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import importlib.metadata
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from ..errors import InputError
from ..inference import CancelFn, Cancelled
from ..rasters import Grid, honour_umask
from .retry import with_retries

DEFAULT_BASE_URL = "https://data.source.coop/tge-labs/aef/v1/annual"
INDEX_NAME = "aef_index.csv"
REQUIRED_COLUMNS = ("path", "crs", "year", "utm_west", "utm_south", "utm_east", "utm_north",
                    "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
_MARKER = "v1/annual/"
_CHUNK = 1 << 20


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
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def _download(url: str, target: Path, cancel: Optional[CancelFn], timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": user_agent()})
    fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".partial", dir=target.parent)
    try:
        honour_umask(tmp)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                if cancel is not None and cancel():
                    raise Cancelled()
                out.write(chunk)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def cached_index(base_url: str, cache_root: Path, *, cancel: Optional[CancelFn] = None, retries: int = 5,
                 retry_delay: float = 1.0, timeout: float = 120.0) -> Path:
    """Path of the mirror's index CSV, downloaded (atomically) on first use."""
    key = hashlib.sha1(base_url.rstrip("/").encode()).hexdigest()[:12]
    target = cache_root / "cog" / "index" / f"{key}_{INDEX_NAME}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = base_url.rstrip("/") + "/" + INDEX_NAME
    try:
        with_retries(lambda: _download(url, target, cancel, timeout), transient=_transient, attempts=retries,
                     base_delay=retry_delay, cancel=cancel)
    except urllib.error.HTTPError as exc:
        raise InputError(url, f"was refused by the server (HTTP {exc.code})",
                         "Check the COG base URL (default " + DEFAULT_BASE_URL + ")") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(url, f"could not be downloaded ({reason})",
                         "Check the internet connection (or proxy) and the COG base URL") from None
    return target


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
