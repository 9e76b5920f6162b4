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
import json
import math
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from ..aoi import bounds_overlap
from ..errors import InputError, SourceError
from ..package_data import version
from ..rasters import replace_when_done
from ..cancel import CancelFn
from ..rasters import Grid
from .network import (DEFAULT_INDEX_DEADLINE, DEFAULT_STALL, Deadline, DeadlineExceeded, NetworkError, StatusFn,
                      download, log_status)
from .retry import GaveUp, with_retries

DEFAULT_BASE_URL = "https://data.source.coop/tge-labs/aef/v1/annual"
INDEX_NAME = "aef_index.csv"
REQUIRED_COLUMNS = ("path", "crs", "year", "utm_west", "utm_south", "utm_east", "utm_north",
                    "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
_MARKER = "v1/annual/"


def user_agent() -> str:
    """alphaearth-height/<version>: the one version (metadata.txt), in a wheel, an editable install or QGIS."""
    return f"alphaearth-height/{version()}"


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
    raise SourceError(url, problem, "Check the COG base URL, and any proxy or captive portal (open the URL "
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
        with_retries(lambda: _download_resumable(url, target, what=what, stall=stall, deadline=limit, cancel=cancel,
                                                 status=say),
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


def _resume_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.resume")


def _download_resumable(url: str, target: Path, *, what: str, stall: float, deadline: Deadline,
                        cancel: Optional[CancelFn], status: StatusFn) -> Path:
    """GET ``url`` into ``target``, resuming a dropped transfer where it stopped (HTTP Range).

    The bytes so far stay in a ``.resume`` file beside the target, across attempts and
    runs, so a dropped connection 700 MB into the 800 MB index costs the rest, not all of
    it again. A server that answers the resumed request whole (200) restarts it. The
    complete file is validated (``index_problem``) before it is renamed into place.
    """
    part = _resume_path(target)
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": user_agent()}
    if have:
        headers["Range"] = f"bytes={have}-"
        status(f"{what}: resuming at {have / 1e6:,.1f} MB")

    with open(part, "ab") as out:
        def answered(code: int, got: dict) -> None:
            if have and code != 206:  # Range ignored: the whole file again, from byte 0
                out.seek(0)
                out.truncate()
            elif code == 206 and not got.get("content-range", "").startswith(f"bytes {have}-"):
                raise NetworkError(f"{what}: the server answered another range than asked "
                                   f"({got.get('content-range')!r}), starting again")

        try:
            _, content_type = download(url, out, what=what, stall=stall, deadline=deadline, cancel=cancel,
                                       status=status, headers=headers, on_answer=answered)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not have:  # 416: nothing after what we have, the file is complete
                raise
            content_type = "text/csv"
        except NetworkError as exc:
            if "another range" in str(exc):
                out.truncate(0)
            raise
    try:
        _check_download(url, part, content_type)
    except InputError:
        part.unlink()
        raise
    os.replace(part, target)
    return target


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}".strip()
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _download_error(url: str, exc: BaseException, tail: str) -> InputError:
    if isinstance(exc, urllib.error.HTTPError) and not _transient(exc):
        return SourceError(url, f"was refused by the server (HTTP {exc.code}){tail}",
                          "Check the COG base URL (default " + DEFAULT_BASE_URL + ")")
    if isinstance(exc, OSError) and not isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return InputError(url, f"could not be saved in the cache ({exc})",
                          "Check the cache folder (--cache-dir) and its free space")
    return SourceError(url, f"could not be downloaded ({_reason(exc)}{tail})",
                      "Check the internet connection (or proxy) and the COG base URL, then run again")


def _crs(value: str) -> CRS:
    value = value.strip()
    return CRS.from_epsg(int(value)) if value.isdigit() else CRS.from_user_input(value)


def select_entries(index: Path, base_url: str, year: int, grid: Grid) -> list[IndexEntry]:
    """Index rows of ``year`` in the whole index CSV ``index`` whose footprint meets the grid."""
    return select_rows(_full_rows(index), base_url, year, grid)


def select_rows(rows: Iterable[dict], base_url: str, year: int, grid: Grid) -> list[IndexEntry]:
    """Rows of ``year`` whose footprint meets the grid, each tested in its own CRS."""
    lon_lat = transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21)
    in_crs: dict[str, tuple[float, float, float, float]] = {}
    entries = []
    for row in rows:
        if row["year"].strip() != str(year):
            continue
        wgs84 = tuple(float(row[f"wgs84_{s}"]) for s in ("west", "south", "east", "north"))
        if not bounds_overlap(wgs84, lon_lat):
            continue
        if row["crs"] not in in_crs:
            in_crs[row["crs"]] = transform_bounds(grid.crs, _crs(row["crs"]), *grid.bounds, densify_pts=21)
        utm = tuple(float(row[f"utm_{s}"]) for s in ("west", "south", "east", "north"))
        if bounds_overlap(utm, in_crs[row["crs"]]):
            entries.append(IndexEntry(tile_url(row["path"], base_url), _crs(row["crs"]), utm))
    return entries


# --- A sliver of the index, by HTTP byte ranges -------------------------------------------------
#
# The published index is ~800 MB (~302 k rows of ~2.6 KB, mostly the WKT footprint) and sorted by
# UTM zone, then year. An area needs the rows of its zone(s) and year: well under 1 % of the file.
# They are found by bisection over byte offsets: a read at any offset skips to the next line
# break, and since no field of the index holds a line break (WKT, numbers, paths) every line
# break ends a row, quoted commas or not. Each row read is checked to have the header's fields.
# The rows found are cached per zone and year, so later fetches there read nothing.

PROBE_BYTES = 32 * 1024     # one bisection read: enough for several rows
MAX_ROW_BYTES = 4 << 20     # a row longer than this means the file is not the index we expect
SECTION_SLACK = 512 * 1024  # bisection stops once a section edge is known within this
ZONE_REACH_M = 170_000.0    # tiles overhang their zone by up to one tile (163,840 m)
_ZONE = re.compile(r"^(\d+)([A-Za-z]*)$")


class IndexShapeError(Exception):
    """The index is not laid out as expected (no ranges, unsorted, odd rows): download it whole."""


@dataclass
class IndexStats:
    """What finding the rows cost: bytes and requests to the index, and whether it was read whole."""

    bytes_read: int = 0
    requests: int = 0
    index_size: int = 0
    whole: bool = False
    from_cache: bool = False


def _zone_key(zone: str, year: int, order: str) -> tuple:
    """Sort key of a row under one of the orders the index may use (zone number, or zone text)."""
    match = _ZONE.match(zone.strip())
    if order == "natural":
        if not match:
            raise IndexShapeError(f"zone {zone!r} is not a UTM zone")
        return int(match.group(1)), match.group(2).upper(), year
    return zone.strip(), year


ORDERS = ("natural", "text")


class RemoteIndex:
    """The remote index CSV read by byte ranges, each with the stall timeout, deadline and retries."""

    def __init__(self, url: str, *, stall: float, deadline: Deadline, cancel: Optional[CancelFn],
                 status: StatusFn, retries: int, retry_delay: float, stats: IndexStats) -> None:
        self.url, self.stall, self.deadline, self.cancel = url, stall, deadline, cancel
        self.say, self.retries, self.retry_delay, self.stats = status, retries, retry_delay, stats
        self.size = 0
        self.failures: list[BaseException] = []  # what the retried attempts met, in order
        self.header: list[str] = []
        self.data_start = 0

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (fewer at the end of the file); a 200 answer means no ranges."""
        import io

        def once() -> bytes:
            buf = io.BytesIO()

            def answered(code: int, headers: dict) -> None:
                if code != 206:
                    raise IndexShapeError(f"the server answered a range request with HTTP {code}, not 206")
                total = headers.get("content-range", "").rsplit("/", 1)[-1]
                if total.isdigit():
                    self.size = int(total)

            say = self.say if self.stats.requests == 0 else self._quiet
            self.stats.requests += 1
            download(self.url, buf, what="the COG tile index", stall=self.stall, deadline=self.deadline,
                     cancel=self.cancel, status=say, on_answer=answered,
                     headers={"User-Agent": user_agent(), "Range": f"bytes={start}-{end - 1}"})
            self.stats.bytes_read += buf.tell()
            return buf.getvalue()

        def retrying(exc: BaseException, delay: float, attempt: int) -> None:
            self.failures.append(exc)
            self.say(f"{_reason(exc)}; trying again in {delay:.0f} s (attempt {attempt + 1} of {self.retries})")

        return with_retries(once, transient=_transient, attempts=self.retries, base_delay=self.retry_delay,
                            cancel=self.cancel, deadline=self.deadline, on_retry=retrying)

    def _quiet(self, message: str) -> None:
        """Status of later range reads: only what is worth hearing (no 'waiting' line per read)."""
        if not message.endswith("without data)"):
            self.say(message)

    def open(self) -> Optional[bytes]:
        """Read the header; returns the whole file when it fit in the first read, else None."""
        first = self.read(0, PROBE_BYTES)
        head = first.split(b"\n", 1)[0]
        try:
            self.header = next(csv.reader([head.decode("utf-8-sig")]), [])
        except UnicodeDecodeError:
            self.header = []
        if b"<html" in first[:4096].lower() or b"<!doctype html" in first[:4096].lower():
            raise SourceError(self.url, "answered an HTML page, not the AEF tile index CSV",
                             "Check the COG base URL, and any proxy or captive portal (open the URL in a browser)")
        _check_columns(self.url, self.header, head)
        if b"\n" not in first:
            raise IndexShapeError("its header line is longer than a range read")
        self.data_start = len(head) + 1
        self.stats.index_size = self.size or len(first)
        return first if self.size and len(first) >= self.size else None

    def line_at(self, offset: int) -> Optional[tuple[int, list[str]]]:
        """The first whole row starting after ``offset`` (at data start for offsets before it):
        (its start, its fields); None when no row starts after ``offset``."""
        skip = offset > self.data_start
        offset = max(offset, self.data_start)
        size = PROBE_BYTES
        while size <= MAX_ROW_BYTES:
            chunk = self.read(offset, offset + size)
            at_end = offset + len(chunk) >= self.size
            begin = chunk.find(b"\n") + 1 if skip else 0
            if skip and begin == 0:
                if at_end:
                    return None
                size *= 4
                continue
            stop = chunk.find(b"\n", begin)
            if stop < 0 and not at_end:
                size *= 4
                continue
            if begin >= len(chunk):
                return None
            return offset + begin, self._fields(chunk[begin:stop if stop >= 0 else len(chunk)])
        raise IndexShapeError(f"a row is longer than {MAX_ROW_BYTES >> 20} MB")

    def _fields(self, line: bytes) -> list[str]:
        try:
            fields = next(csv.reader([line.decode("utf-8").rstrip("\r")]), [])
        except UnicodeDecodeError:
            raise IndexShapeError("a row is not UTF-8 text") from None
        if len(fields) != len(self.header):
            raise IndexShapeError(f"a row has {len(fields)} fields, the header {len(self.header)}")
        return fields

    def rows(self, start: int, end: int) -> list[list[str]]:
        """The rows in [start, end), both row starts (or the end of the file), in one request."""
        chunk = self.read(start, end) if end > start else b""
        return [self._fields(line) for line in chunk.split(b"\n") if line.strip()]


def _check_columns(url: str, header: list[str], head: bytes) -> None:
    """A header without the index's columns is an answer, not a shape to work around."""
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if not missing:
        return
    start = " ".join(head[:60].decode("utf-8", "replace").split())
    if "path" in missing and len(missing) < len(REQUIRED_COLUMNS) // 2:
        raise InputError(url, "has no path column (Google's own bucket publishes its index without file paths)",
                         "Use the Source Cooperative mirror (the default base URL " + DEFAULT_BASE_URL + ")")
    raise InputError(url, f"is not an AEF tile index (no {', '.join(missing[:3])} column; it starts {start!r})",
                     "Check the COG base URL, and any proxy or captive portal (open the URL in a browser)")
class SectionFinder:
    """Finds the rows of one UTM zone and year in the sorted remote index by bisection.

    Every row read is remembered; a row out of order with its neighbours means the index
    is not sorted as expected (IndexShapeError), so a wrong guess can never drop rows.
    """

    SAMPLES = 8

    def __init__(self, remote: RemoteIndex) -> None:
        self.remote = remote
        self.zone_col = remote.header.index("utm_zone")
        self.year_col = remote.header.index("year")
        self.known: dict[int, list[str]] = {}  # row start -> fields
        self.order = ORDERS[0]

    def _key(self, fields: list[str]) -> tuple:
        try:
            return _zone_key(fields[self.zone_col], int(fields[self.year_col]), self.order)
        except ValueError:
            raise IndexShapeError(f"year {fields[self.year_col]!r} is not a number") from None

    def _probe(self, offset: int) -> Optional[int]:
        """Read the row after ``offset``, remember it; its start (None past the last row)."""
        found = self.remote.line_at(offset)
        if found is None:
            return None
        self.known[found[0]] = found[1]
        return found[0]

    def sample(self) -> "SectionFinder":
        """Rows spread over the file; picks the order they are sorted in (zone number or zone text)."""
        size = self.remote.size
        for k in range(self.SAMPLES):
            self._probe(self.remote.data_start + (size - self.remote.data_start) * k // self.SAMPLES)
        self._probe(max(self.remote.data_start, size - PROBE_BYTES // 2))
        for order in ORDERS:
            self.order = order
            try:
                self._check_sorted()
                return self
            except IndexShapeError:
                continue
        raise IndexShapeError("its rows are not sorted by UTM zone, then year")

    def _check_sorted(self) -> None:
        keys = [self._key(self.known[s]) for s in sorted(self.known)]
        if any(a > b for a, b in zip(keys, keys[1:])):
            raise IndexShapeError("its rows are not sorted by UTM zone, then year")

    def zone_text(self, number: int, hemisphere: str) -> str:
        """How this index spells a zone ("31N", "31", "05N"), as seen in the rows read."""
        zones = [f[self.zone_col].strip() for f in self.known.values()]
        letters = all(_ZONE.match(z) and _ZONE.match(z).group(2) for z in zones)
        padded = any(len(z) > 1 and z[0] == "0" for z in zones)
        return (f"{number:02d}" if padded else str(number)) + (hemisphere if letters else "")

    def _bound(self, target: tuple, above: bool) -> int:
        """A row start at or before the first row with key >= target (> target with ``above``),
        or, with ``above``, a row start (or the file's end) at or after it."""
        lo, hi = self.remote.data_start, self.remote.size
        for start in sorted(self.known):
            key = self._key(self.known[start])
            if key < target or (above and key == target):
                lo = start
            elif start < hi:
                hi = start
                break
        while hi - lo > SECTION_SLACK:
            start = self._probe((lo + hi) // 2)
            if start is None or start >= hi:
                break
            self._check_sorted()
            key = self._key(self.known[start])
            if key < target or (above and key == target):
                lo = start
            else:
                hi = start
        return hi if above else lo

    def section(self, zone: str, year: int) -> list[list[str]]:
        """The rows of ``zone`` and ``year`` (all of them: the rows around are read and checked)."""
        target = _zone_key(zone, year, self.order)
        start, end = self._bound(target, False), self._bound(target, True)
        rows = self.remote.rows(start, end)
        keys = [self._key(r) for r in rows]
        if any(a > b for a, b in zip(keys, keys[1:])):
            raise IndexShapeError("its rows are not sorted by UTM zone, then year")
        return [r for r, k in zip(rows, keys) if k == target]


def target_zones(grid: Grid, spell: Callable[[int, str], str]) -> list[str]:
    """The UTM zones whose tiles may cover the grid: its own, and neighbours within a tile's
    overhang (ZONE_REACH_M), in the hemispheres it reaches."""
    west, south, east, north = transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21)
    reach_lat = ZONE_REACH_M / 111_320.0
    widest = max(abs(south), abs(north)) + reach_lat
    reach_lon = min(6.0, ZONE_REACH_M / (111_320.0 * max(0.05, math.cos(math.radians(min(89.0, widest))))))
    first = int((west - reach_lon + 180.0) // 6.0)
    last = int((east + reach_lon + 180.0) // 6.0)
    numbers = sorted({k % 60 + 1 for k in range(first, min(last, first + 59) + 1)})
    hemispheres = [h for h, near in (("N", north >= -reach_lat), ("S", south <= reach_lat)) if near]
    return [spell(n, h) for n in numbers for h in hemispheres]


def _slice_folder(base_url: str, cache_root: Path) -> Path:
    return index_path(base_url, cache_root).with_suffix(".slices")


def _slice_path(folder: Path, zone: str, year: int) -> Path:
    return folder / f"{re.sub(r'[^0-9A-Za-z]', '_', zone)}_{year}.csv"


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Atomically: a half-written slice must never pass for the rows of a zone."""
    with replace_when_done(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def index_rows(base_url: str, cache_root: Path, grid: Grid, year: int, *, cancel: Optional[CancelFn] = None,
               retries: int = 5, retry_delay: float = 1.0, stall: float = DEFAULT_STALL,
               deadline: float = DEFAULT_INDEX_DEADLINE,
               status: Optional[StatusFn] = None) -> tuple[Iterable[dict], IndexStats]:
    """The index rows of the zones around ``grid`` for ``year``, reading as little as possible.

    In order: a whole index already cached (older versions, or the fallback); the cached
    slices of these zones and year (no network); byte ranges into the remote index, whose
    slices are then cached; and, when the index is not laid out as expected (the server
    ignores Range, the rows are not sorted by zone then year), the whole index, downloaded
    once and resumably, as the status line says.
    """
    say = status or log_status
    stats = IndexStats()
    folder = _slice_folder(base_url, cache_root)
    layout_file = folder / "layout.json"
    full = index_path(base_url, cache_root)
    if full.is_file():
        problem = index_problem(full)
        if problem is None:
            stats.whole = stats.from_cache = True
            return _full_rows(full), stats
        say(f"the cached tile index {full} {problem}: deleted, reading it again")  # e.g. an HTML page kept by
        full.unlink()                                                               # an older version
    if layout_file.is_file():
        layout = json.loads(layout_file.read_text(encoding="utf-8"))
        zones = target_zones(grid, lambda n, h: _spell(layout, n, h))
        paths = [_slice_path(folder, z, year) for z in zones]
        if all(p.is_file() for p in paths):
            stats.from_cache = True
            return [row for p in paths for row in _read_csv(p)], stats
    url = base_url.rstrip("/") + "/" + INDEX_NAME
    limit = Deadline(deadline, "the COG tile index")
    remote = RemoteIndex(url, stall=stall, deadline=limit, cancel=cancel, status=say, retries=retries,
                         retry_delay=retry_delay, stats=stats)
    try:
        try:
            whole = remote.open()
            if whole is not None:  # a small index arrived whole in the first read: keep it whole
                return _keep_whole(url, whole, full), stats
            finder = SectionFinder(remote).sample()
            zones = target_zones(grid, finder.zone_text)
            sections = {z: finder.section(z, year) for z in zones}
        except (GaveUp, DeadlineExceeded) as exc:  # the deadline cut an attempt: say what the earlier ones met
            last = exc.last if isinstance(exc, GaveUp) else (remote.failures or [exc])[-1]
            raise _download_error(url, last, f"; gave up within the {deadline:g} s deadline after "
                                             f"{len(remote.failures) + 1} attempt(s)") from None
        except (urllib.error.URLError, http.client.HTTPException, NetworkError) as exc:
            tail = f"; {len(remote.failures) + 1} attempt(s)" if remote.failures else ""
            raise _download_error(url, exc, tail) from None
    except IndexShapeError as exc:
        stats.whole = True
        size = f" ({stats.index_size / 1e6:,.0f} MB)" if stats.index_size else ""
        say(f"the COG tile index is not laid out as expected ({exc}): downloading all of it{size} once instead, "
            "resumably, and keeping it")
        path = cached_index(base_url, cache_root, cancel=cancel, retries=retries, retry_delay=retry_delay,
                            stall=stall, deadline=deadline, status=say)
        return _full_rows(path), stats
    folder.mkdir(parents=True, exist_ok=True)
    for zone, rows in sections.items():
        _write_csv(_slice_path(folder, zone, year), remote.header, rows)
    layout = {"zones": [f[finder.zone_col] for f in finder.known.values()], "order": finder.order,
              "index_bytes": stats.index_size}
    layout_file.write_text(json.dumps(layout), encoding="utf-8")
    say(f"read {stats.bytes_read / 1e6:,.1f} MB of the {stats.index_size / 1e6:,.0f} MB tile index in "
        f"{stats.requests} range requests (zones {', '.join(zones)} for {year}: "
        f"{sum(len(r) for r in sections.values())} rows), cached for later fetches")
    header = remote.header
    return [dict(zip(header, r)) for rows in sections.values() for r in rows], stats


def _spell(layout: dict, number: int, hemisphere: str) -> str:
    zones = [z.strip() for z in layout.get("zones", [])]
    letters = bool(zones) and all(_ZONE.match(z) and _ZONE.match(z).group(2) for z in zones)
    padded = any(len(z) > 1 and z[0] == "0" for z in zones)
    return (f"{number:02d}" if padded else str(number)) + (hemisphere if letters else "")


def _keep_whole(url: str, data: bytes, full: Path) -> Iterable[dict]:
    """Cache an index that arrived whole (validated like a download) and read its rows."""
    full.parent.mkdir(parents=True, exist_ok=True)
    with replace_when_done(full) as tmp:
        Path(tmp).write_bytes(data)
        _check_download(url, Path(tmp), "text/csv")
    return _full_rows(full)


def _full_rows(path: Path) -> Iterable[dict]:
    """Rows of a whole cached index, streamed (it can be 800 MB)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(path, f"is not an AEF tile index (missing columns {', '.join(missing)})",
                             "Delete it (clear the cache) so it is downloaded again, or check the base URL")
        yield from reader
