"""The "local" source: a 64-band embeddings raster already on disk (or a layer's file).

Without a caller's grid the output keeps the raster's own pixel grid, clipped to the
AOI (int8 pixels are copied unchanged, float exports quantised to AEF int8); with one,
the raster is resampled onto it with nearest neighbour.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np

from ..aoi import AreaOfInterest, aoi_window
from ..errors import InputError
from ..cancel import CancelFn
from ..rasters import EmbeddingRaster, Grid
from .base import EmbeddingSource
from .sampling import sample_nearest


class LocalSource(EmbeddingSource):
    name = "local"
    cacheable = False
    tile_size = 1024

    def __init__(self, raster: str | os.PathLike | None = None) -> None:
        if not raster:
            raise InputError("local source", "needs an embeddings raster",
                             "Give the raster's path (--local-raster, or pick a layer)")
        self.path = str(raster)
        self._raster = EmbeddingRaster(self.path)  # fails early on a bad file
        self._lock = threading.Lock()

    def inputs(self) -> tuple[str, ...]:
        return (self.path,)

    def grid_for(self, aoi: AreaOfInterest, grid: Optional[Grid]) -> Grid:
        if grid is not None:
            return super().grid_for(aoi, grid)
        own = self._raster.grid
        window = aoi_window(own, aoi, self.path)
        return Grid(own.crs, own.window_transform(window), int(window.width), int(window.height))

    def extent(self) -> Grid:
        return self._raster.grid

    def read(self, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        with self._lock:  # one GDAL handle: not to be shared between threads
            return sample_nearest(self._raster, tile)

    def describe(self) -> str:
        return f"local raster {os.path.basename(self.path)}"

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        return {"requests": 0, "download_bytes": 0}

    def close(self) -> None:
        self._raster.close()
