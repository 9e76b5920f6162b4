"""The "cog" source: the public AEF Cloud-Optimized GeoTIFFs, read by HTTP byte ranges.

Only the blocks under each tile are downloaded (GDAL /vsicurl/). The files are int8,
companded (core.aef.dequantise) and stored bottom-up, which core.rasters.EmbeddingRaster
undoes. Each COG is read on its own UTM grid; an output tile in another zone gets the
pixel under each of its pixel centres (nearest), its own zone's files taking priority.

Network limits (core.fetch.network): a transfer under 1 KB per stall window is cut by
curl's low-speed rule, each HTTP request is cut at the tile's deadline, and a tile's
retries stop at that deadline; HTTP 4xx answers are not retried.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.warp import transform_bounds

from .. import aef
from ..aoi import AreaOfInterest
from ..errors import InputError
from ..inference import CancelFn
from ..rasters import EmbeddingRaster, Grid
from .base import EmbeddingSource
from .cog_index import DEFAULT_BASE_URL, IndexEntry, cached_index, select_entries, user_agent
from .network import STALL_BYTES, Deadline, NetworkLimits, host_of
from .retry import GaveUp, with_retries
from .sampling import sample_nearest


# An HTTP 4xx is the server's answer. GDAL's "does not exist in the file system" is not: it
# also comes from its memory of an earlier failed open (another tile's stall), for a while.
_PERMANENT = re.compile(r"HTTP response code: 4\d\d\b")
_HTTP_CODE = re.compile(r"HTTP response code: (\d{3})\b")


def _gdal_failure(exc: BaseException) -> bool:
    """A GDAL open or read failure (raw, or as core.rasters' one-line 'cannot be read' error)."""
    return isinstance(exc, RasterioIOError) or isinstance(exc, InputError) and "cannot be read" in exc.problem


def _transient(exc: BaseException) -> bool:
    """GDAL read/open failures (stalls, dropped connections, 5xx after GDAL's own retries).

    An HTTP 4xx is the server's answer (refused, not there) and is not retried.
    """
    return _gdal_failure(exc) and not _PERMANENT.search(str(exc))


def _gdal_reason(exc: BaseException, url: str) -> str:
    text = exc.problem if isinstance(exc, InputError) else str(exc)
    text = " ".join(text.replace(f"/vsicurl/{url}", "the file").split())
    code = _HTTP_CODE.search(text)
    if code:
        return f"HTTP {code.group(1)}"
    if "too slow" in text.lower():
        return "the transfer stalled"
    if "timed out" in text.lower():
        return "the request timed out"
    return text or type(exc).__name__


class CogSource(EmbeddingSource):
    name = "cog"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, cache_root: Optional[Path] = None,
                 tile_size: int = 512, workers: int = 4, retries: int = 5, retry_delay: float = 1.0,
                 stall_timeout: Optional[float] = None, tile_deadline: Optional[float] = None,
                 index_deadline: Optional[float] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_root = cache_root
        self.tile_size, self.workers = tile_size, max(1, workers)
        self.retries, self.retry_delay = max(1, retries), retry_delay
        self.limits = NetworkLimits.from_env(stall_timeout, tile_deadline, index_deadline)
        self._entries: Optional[list[IndexEntry]] = None

    def gdal_options(self, request_timeout: float, fresh_url: Optional[str] = None) -> dict:
        """/vsicurl/ settings: our User-Agent, the stall rule (curl's low-speed limit: under
        1 KB per stall window), a per-request timeout, and on a retry no cached failure."""
        stall = self.limits.stall
        options = {"GDAL_HTTP_USERAGENT": user_agent(), "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                   "GDAL_HTTP_MAX_RETRY": "0",
                   "GDAL_HTTP_CONNECTTIMEOUT": str(max(1, math.ceil(stall))),
                   "GDAL_HTTP_LOW_SPEED_TIME": str(max(1, math.ceil(stall))),
                   "GDAL_HTTP_LOW_SPEED_LIMIT": str(max(1, math.ceil(STALL_BYTES / stall))),
                   "GDAL_HTTP_TIMEOUT": str(max(1, math.ceil(request_timeout)))}
        if fresh_url:  # GDAL remembers a failed open per URL; a retry must really ask again
            options["CPL_VSIL_CURL_NON_CACHED"] = f"/vsicurl/{fresh_url}"
        return options

    def entries(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> list[IndexEntry]:
        if self._entries is None:
            if self.cache_root is None:
                raise InputError("cog source", "has no cache folder for the tile index", "Give cache_dir")
            index = cached_index(self.base_url, self.cache_root, cancel=cancel, retries=self.retries,
                                 retry_delay=self.retry_delay, stall=self.limits.stall,
                                 deadline=self.limits.index_deadline, status=self.status)
            self._entries = select_entries(index, self.base_url, year, grid)
        return self._entries

    def prepare(self, aoi: AreaOfInterest, grid: Grid, year: int, cancel: Optional[CancelFn]) -> None:
        if not self.entries(grid, year, cancel):
            raise InputError(f"area of interest ({aoi.crs} {tuple(round(v, 4) for v in aoi.bounds)})",
                             f"is not covered by any AlphaEarth COG for {year}",
                             "Check the year (the mirror may lack some years) and the area")

    def read(self, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        out = np.full((aef.N_BANDS, tile.height, tile.width), np.nan, dtype=np.float32)
        for entry in self._covering(tile):
            missing = np.isnan(out).any(axis=0)
            if not missing.any():
                break
            values = self._read_file(entry.url, tile, cancel)
            take = missing & np.isfinite(values).all(axis=0)
            out[:, take] = values[:, take]
        return out

    def _covering(self, tile: Grid) -> list[IndexEntry]:
        """Files meeting the tile, those in the tile's own CRS first (no resampling)."""
        hits = []
        for entry in self._entries or ():
            b = transform_bounds(tile.crs, entry.crs, *tile.bounds, densify_pts=5)
            if b[0] < entry.bounds[2] and b[2] > entry.bounds[0] and b[1] < entry.bounds[3] and b[3] > entry.bounds[1]:
                hits.append(entry)
        return sorted(hits, key=lambda e: (e.crs != tile.crs, e.url))

    def _read_file(self, url: str, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        """One COG's pixels under the tile, retried within the tile deadline; failures in one line."""
        deadline = Deadline(self.limits.tile_deadline, "a tile")
        attempts = [0]
        reasons: list[str] = []  # what the attempts met, in order, each once

        def attempt() -> np.ndarray:
            attempts[0] += 1
            return self._sample(url, tile, max(1.0, deadline.left()), retry=attempts[0] > 1)

        def retrying(exc: BaseException, delay: float, n: int) -> None:
            reason = _gdal_reason(exc, url)
            reasons.append(reason) if reason not in reasons else None
            self.status(f"{host_of(url)}: {reason} reading {url.rsplit('/', 1)[-1]}; "
                        f"trying again in {delay:.0f} s (attempt {n + 1} of {self.retries})")

        def met(exc: BaseException) -> str:
            last = _gdal_reason(exc, url)
            return ", then ".join(reasons + ([last] if last not in reasons else []))

        fix = "Check the network connection and the COG base URL, then run again: finished tiles are cached"
        try:
            return with_retries(attempt, transient=_transient, attempts=self.retries, base_delay=self.retry_delay,
                                cancel=cancel, deadline=deadline, min_attempt=self.limits.stall,
                                on_retry=retrying)
        except GaveUp as exc:
            raise InputError(url, f"could not be read ({met(exc.last)}; gave up within the "
                                  f"{self.limits.tile_deadline:g} s tile deadline after {exc.attempts} attempt(s))",
                             fix) from None
        except (RasterioIOError, InputError) as exc:
            if not _gdal_failure(exc):
                raise
            if not _transient(exc):
                raise InputError(url, f"was refused by the server ({_gdal_reason(exc, url)})",
                                 "Check the COG base URL (default " + DEFAULT_BASE_URL + ") and the year") from None
            raise InputError(url, f"could not be read ({met(exc)}; {attempts[0]} attempt(s))", fix) from None

    def _sample(self, url: str, tile: Grid, request_timeout: float, retry: bool = False) -> np.ndarray:
        options = self.gdal_options(request_timeout, url if retry else None)
        with rasterio.Env(**options), EmbeddingRaster(f"/vsicurl/{url}") as raster:
            return sample_nearest(raster, tile)

    def describe(self) -> str:
        return f"AlphaEarth COGs {self.base_url}"

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        return {"requests": tiles, "download_bytes": grid.width * grid.height * aef.N_BANDS}

    def coverage(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> dict:
        return {"files": len(self.entries(grid, year, cancel))}
