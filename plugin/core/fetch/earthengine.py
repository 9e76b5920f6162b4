"""The "earthengine" source: GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL through computePixels.

Earth Engine resamples onto the grid we ask for, so every request is one output tile.
A request is capped at 48 MB uncompressed: 64 float32 bands allow about 440 x 440 px,
so tiles are 384 px (37.7 MB). The bands' data type is not documented, so the image is
cast to float32 (``toFloat``) before it is requested: the request size is then what we
computed. Quota errors (429) and server errors (5xx, matched as whole status codes) are
retried with exponential backoff within the tile deadline (core.fetch.network); a
request-size or invalid-argument error is permanent and fails at once. The library is
imported and initialised only when used.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Optional

import numpy as np

from .. import aef
from ..aoi import AreaOfInterest
from ..errors import InputError, SourceError
from ..cancel import CancelFn, Cancelled
from ..rasters import Grid
from .base import EmbeddingSource
from .network import Deadline, NetworkLimits
from .retry import GaveUp, with_retries

COLLECTION = "GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL"
MAX_REQUEST_BYTES = 48 * 1024 * 1024
BYTES_PER_PIXEL = aef.N_BANDS * 4
DEFAULT_TILE = 384
PROJECT_ENV = ("EARTHENGINE_PROJECT", "GOOGLE_CLOUD_PROJECT")
# Whole HTTP status codes only: "must be less than or equal to 50331648 bytes" holds "503".
_TRANSIENT_CODES = re.compile(r"(?<![\w.])(429|500|502|503|504)(?![\w.])")
_TRANSIENT = ("too many requests", "quota exceeded", "rate limit", "internal error", "backend error",
              "service unavailable", "unavailable", "deadline", "timed out", "timeout", "connection reset",
              "connection aborted", "connection refused", "temporarily")
# Answers that the same request will always get again.
_PERMANENT = ("request size", "must be less than or equal to", "invalid argument", "invalid_argument",
              "bad request", "permission denied", "permission_denied", "not found", "not_found",
              "does not exist", "did not match any bands")
_AUTH_FIX = ("Run `earthengine authenticate` once in a terminal (or ee.Authenticate() in Python), "
             "then fetch again; or use the 'cog' source, which needs no account")
_PROJECT_FIX = ("Give your Google Cloud project id (registered for Earth Engine) with --project, the "
                "dock's project setting or the EARTHENGINE_PROJECT environment variable")

_init_lock = threading.Lock()
_initialised: set[Optional[str]] = set()


def import_ee() -> Any:
    try:
        import ee
    except ImportError:
        raise InputError("earthengine-api", "is not installed",
                         "Install it (python -m pip install earthengine-api; in QGIS, accept the plugin's "
                         "offer to install it), or use the 'cog' source") from None
    return ee


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network failures, 429 and 5xx; never a request-size or invalid-argument error."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    if any(marker in text for marker in _PERMANENT):
        return False
    return bool(_TRANSIENT_CODES.search(text)) or any(marker in text for marker in _TRANSIENT)


def explain(exc: BaseException, project: Optional[str]) -> InputError:
    """Turn an Earth Engine error into a one-line message saying how to fix it."""
    text = str(exc)
    low = text.lower()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "earthengine authenticate" in low or "authorize access" in low or "credentials" in low \
            or "unauthenticated" in low or "invalid_grant" in low:
        return SourceError("Earth Engine", "is not authenticated on this computer", _AUTH_FIX)
    if "no project found" in low or "project" in low and ("not registered" in low or "has not been used" in low
                                                          or "permission" in low or "denied" in low):
        what = f"cannot use Cloud project {project!r}" if project else "needs a Google Cloud project"
        return SourceError("Earth Engine", f"{what} ({first})", _PROJECT_FIX)
    if "request size" in low or "must be less than or equal to" in low:
        return SourceError("Earth Engine", f"refused a request as too large ({first})",
                          "Give a smaller tile size (the default 384 px fits the 48 MB limit)")
    if "invalid argument" in low or "invalid_argument" in low:
        return SourceError("Earth Engine", f"refused a request as invalid ({first})",
                          "Check the area and year; report it if it persists")
    return SourceError("Earth Engine", f"failed: {first}",
                      "Check the network and your quota, then run again: finished tiles are cached")


def initialise(project: Optional[str], request_timeout: Optional[float] = None) -> Any:
    """ee.Initialize once per process and project; never at import.

    ``request_timeout`` (s) becomes Earth Engine's HTTP timeout unless someone in this
    process already set one (ee.data.setDeadline): without it a request can wait forever.
    """
    ee = import_ee()
    with _init_lock:
        if project not in _initialised:
            try:
                ee.Initialize(project=project) if project else ee.Initialize()
            except Exception as exc:  # noqa: BLE001 - EEException, google.auth errors
                raise explain(exc, project) from None
            _initialised.add(project)
            state = getattr(ee.data, "_get_state", None)
            if request_timeout and state is not None and not getattr(state(), "deadline_ms", 0):
                ee.data.setDeadline(int(request_timeout * 1000))
    return ee


def grid_request(tile: Grid) -> dict:
    """computePixels' grid for a north-up tile."""
    t = tile.transform
    epsg = tile.crs.to_epsg()
    crs = {"crsCode": f"EPSG:{epsg}"} if epsg else {"crsWkt": tile.crs.to_wkt()}
    return {"dimensions": {"width": tile.width, "height": tile.height},
            "affineTransform": {"scaleX": t.a, "shearX": t.b, "translateX": t.c,
                                "shearY": t.d, "scaleY": t.e, "translateY": t.f}, **crs}


class EarthEngineSource(EmbeddingSource):
    name = "earthengine"

    def __init__(self, project: Optional[str] = None, tile_size: int = DEFAULT_TILE, workers: int = 6,
                 retries: int = 6, retry_delay: float = 2.0, stall_timeout: Optional[float] = None,
                 tile_deadline: Optional[float] = None) -> None:
        if tile_size * tile_size * BYTES_PER_PIXEL > MAX_REQUEST_BYTES or tile_size < 16:
            raise InputError(f"tile size {tile_size}", "is outside what one Earth Engine request allows",
                             "Use 16-440 px (default 384)")
        self.project = project or next((os.environ[v] for v in PROJECT_ENV if os.environ.get(v)), None)
        self.tile_size, self.workers = tile_size, max(1, workers)
        self.retries, self.retry_delay = max(1, retries), retry_delay
        self.limits = NetworkLimits.from_env(stall_timeout, tile_deadline)
        self._ee: Any = None
        self._image: Any = None

    def prepare(self, aoi: AreaOfInterest, grid: Grid, year: int, cancel: Optional[CancelFn]) -> None:
        self.status(f"Earth Engine: signing in (project {self.project or 'from the stored credentials'})")
        ee = initialise(self.project, self.limits.tile_deadline)
        west, south, east, north = aoi.bounds_in("EPSG:4326")
        region = ee.Geometry.Rectangle([west, south, east, north], "EPSG:4326", False)
        collection = (ee.ImageCollection(COLLECTION)
                      .filterDate(f"{year}-01-01", f"{year + 1}-01-01").filterBounds(region))
        # float32 whatever the stored type: BYTES_PER_PIXEL, and so the request size, hold
        self._ee, self._image = ee, collection.mosaic().select(list(aef.BAND_NAMES)).toFloat()

    def read(self, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        request = {"expression": self._image, "fileFormat": "NUMPY_NDARRAY", "grid": grid_request(tile),
                   "bandIds": list(aef.BAND_NAMES)}
        deadline = Deadline(self.limits.tile_deadline, "an Earth Engine request")

        def retrying(exc: BaseException, delay: float, attempt: int) -> None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.status(f"Earth Engine: {first}; trying again in {delay:.0f} s (attempt {attempt + 1} of "
                        f"{self.retries})")

        try:
            pixels = with_retries(lambda: self._ee.data.computePixels(request), transient=is_transient,
                                  attempts=self.retries, base_delay=self.retry_delay, cancel=cancel,
                                  deadline=deadline, on_retry=retrying)
        except Cancelled:
            raise
        except GaveUp as exc:
            error = explain(exc.last, self.project)
            raise InputError(error.subject, f"{error.problem} (gave up within the {self.limits.tile_deadline:g} s "
                                            f"tile deadline after {exc.attempts} attempt(s))", error.fix) from None
        except Exception as exc:  # noqa: BLE001 - EEException after retries, network errors
            raise explain(exc, self.project) from None
        values = np.stack([np.asarray(pixels[b], dtype=np.float32) for b in aef.BAND_NAMES])
        if values.shape != (aef.N_BANDS, tile.height, tile.width):
            raise InputError("Earth Engine", f"returned {values.shape[1:]} px for a {tile.height}x{tile.width} "
                             "request", "Run again; report it if it persists")
        # Masked pixels arrive as 0 in every band; a unit-length embedding is never all zeros.
        values[:, (values == 0).all(axis=0)] = np.nan
        return values

    def describe(self) -> str:
        return f"Google Earth Engine {COLLECTION}"

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        return {"requests": tiles, "download_bytes": grid.width * grid.height * BYTES_PER_PIXEL,
                "project": self.project}
