"""The "cog" source: the public AEF Cloud-Optimized GeoTIFFs, read by HTTP byte ranges.

Only the blocks under each tile are downloaded (GDAL /vsicurl/). The files are int8,
companded (core.aef.dequantise) and stored bottom-up, which core.rasters.EmbeddingRaster
undoes. Each COG is read on its own UTM grid; an output tile in another zone gets the
pixel under each of its pixel centres (nearest), its own zone's files taking priority.
"""

from __future__ import annotations

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
from .retry import with_retries
from .sampling import sample_nearest


def _transient(exc: BaseException) -> bool:
    """GDAL read/open failures (dropped connections, 5xx after GDAL's own retries)."""
    if isinstance(exc, RasterioIOError):
        return True
    return isinstance(exc, InputError) and "cannot be read" in exc.problem


class CogSource(EmbeddingSource):
    name = "cog"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, cache_root: Optional[Path] = None,
                 tile_size: int = 512, workers: int = 4, retries: int = 5, retry_delay: float = 1.0,
                 http_timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_root = cache_root
        self.tile_size, self.workers = tile_size, max(1, workers)
        self.retries, self.retry_delay, self.http_timeout = max(1, retries), retry_delay, http_timeout
        self._entries: Optional[list[IndexEntry]] = None

    def gdal_options(self) -> dict:
        return {"GDAL_HTTP_USERAGENT": user_agent(), "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                "GDAL_HTTP_MAX_RETRY": str(self.retries), "GDAL_HTTP_RETRY_DELAY": str(self.retry_delay),
                "GDAL_HTTP_TIMEOUT": str(int(self.http_timeout))}

    def entries(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> list[IndexEntry]:
        if self._entries is None:
            if self.cache_root is None:
                raise InputError("cog source", "has no cache folder for the tile index", "Give cache_dir")
            index = cached_index(self.base_url, self.cache_root, cancel=cancel, retries=self.retries,
                                 retry_delay=self.retry_delay, timeout=self.http_timeout)
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
            values = with_retries(lambda: self._sample(entry.url, tile), transient=_transient,
                                  attempts=self.retries, base_delay=self.retry_delay, cancel=cancel)
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

    def _sample(self, url: str, tile: Grid) -> np.ndarray:
        with rasterio.Env(**self.gdal_options()), EmbeddingRaster(f"/vsicurl/{url}") as raster:
            return sample_nearest(raster, tile)

    def describe(self) -> str:
        return f"AlphaEarth COGs {self.base_url}"

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        return {"requests": tiles, "files": len(self.entries(grid, year)),
                "download_bytes": grid.width * grid.height * aef.N_BANDS}
