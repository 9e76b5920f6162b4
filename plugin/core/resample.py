"""A height raster (a reference DSM, a coarse terrain) seen on another grid: warped on the
fly, window by window, with the resampling its resolution calls for.

Comparison, terrain-relative prediction, training pairs and bias correction all need a
raster on the prediction's grid; this is the one place that decides how.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from .aoi import bounds_overlap
from .errors import InputError
from .rasters import Grid, open_raster, read_or_fail


def reference_resampling(reference: rasterio.DatasetReader, grid: Grid) -> Resampling:
    """Average when the reference is finer than the grid (as the paper's 5 m -> 10 m), else bilinear."""
    if reference.crs is None:
        return Resampling.bilinear
    # Compare pixel areas in the grid's units via the footprint of the whole raster.
    left, bottom, right, top = transform_bounds(reference.crs, grid.crs, *reference.bounds)
    ref_px = abs((right - left) * (top - bottom)) / max(reference.width * reference.height, 1)
    grid_px = grid.resolution[0] * grid.resolution[1]
    return Resampling.average if ref_px < grid_px else Resampling.bilinear


class ReferenceOnGrid:
    """A reference DSM seen through a warp onto a target grid, read by windows (NaN = no data).

    A raster of several bands needs ``band`` (1-based): silently taking band 1 of, say,
    the 64-band embeddings would compare heights with an embedding component.
    """

    def __init__(self, path: str | os.PathLike, grid: Grid, band: Optional[int] = None) -> None:
        self.path = str(path)
        self._src = open_raster(path)
        try:
            self.band = _height_band(path, self._src.count, band)
        except InputError:
            self._src.close()
            raise
        if self._src.crs is None:
            self._src.close()
            raise InputError(path, "has no coordinate reference system",
                             "Assign one, e.g. gdal_edit.py -a_srs EPSG:2154 FILE")
        bounds = transform_bounds(self._src.crs, grid.crs, *self._src.bounds, densify_pts=21)
        if not bounds_overlap(bounds, grid.bounds):
            self._src.close()
            raise InputError(path, f"does not overlap the target area (reference {_fmt(bounds)} vs "
                             f"target {_fmt(grid.bounds)} in {grid.crs.to_string()})",
                             "Give a reference DSM that covers the predicted area")
        self.resampling = reference_resampling(self._src, grid)
        nodata = self._src.nodata
        self._vrt = WarpedVRT(self._src, crs=grid.crs, transform=grid.transform, width=grid.width,
                              height=grid.height, resampling=self.resampling, dtype="float32",
                              src_nodata=nodata, nodata=np.nan,
                              # each band's own nodata: by default GDAL takes a pixel as nodata only where
                              # every band is, so band 2's holes would be averaged in beside band 1's data
                              UNIFIED_SRC_NODATA="NO")

    def read(self, window: Window) -> np.ndarray:
        values = read_or_fail(self._vrt, self.path, self.band, window=window, masked=True)
        return values.filled(np.nan).astype(np.float32, copy=False)

    def close(self) -> None:
        self._vrt.close()
        self._src.close()

    def __enter__(self) -> "ReferenceOnGrid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _height_band(path: object, count: int, band: Optional[int]) -> int:
    """The 1-based band holding heights: the only one, or the one chosen among several."""
    if band is None:
        if count != 1:
            raise InputError(path, f"has {count} bands but a height raster has one (band 1 would be taken "
                             "without being asked for)", "Choose the band that holds heights "
                             "(compare --reference-band N, 'Reference band' in Processing) or extract it: "
                             "gdal_translate -b N IN OUT")
        return 1
    if not 1 <= int(band) <= count:
        raise InputError(f"reference band {band}", f"is not a band of {path}, which has {count}",
                         f"Choose a band from 1 to {count}")
    return int(band)


def _fmt(bounds: tuple) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in bounds) + "]"
