"""Nearest-neighbour sampling of an embeddings raster onto another grid.

Embeddings are unit vectors: averaging neighbours (bilinear, cubic) makes vectors the
model never saw, so a grid change always takes the source pixel under each target
pixel's centre. Target centres are projected exactly (no approximate transformer), so
the result does not depend on how the target is tiled.
"""

from __future__ import annotations

import numpy as np
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from .. import aef
from ..rasters import EmbeddingRaster, Grid

MAX_SOURCE_PIXELS = 4_000_000  # per read; bigger footprints are split


def source_pixels(src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Integer (row, col) in ``src`` of each ``dst`` pixel centre (may fall outside src)."""
    cols, rows = np.meshgrid(np.arange(dst.width) + 0.5, np.arange(dst.height) + 0.5)
    xs, ys = dst.transform * (cols.ravel(), rows.ravel())
    if src.crs != dst.crs:
        xs, ys = (np.asarray(v) for v in transform_points(dst.crs, src.crs, xs, ys))
    c, r = ~src.transform * (np.asarray(xs), np.asarray(ys))
    return (np.floor(np.asarray(r)).astype(np.int64).reshape(dst.height, dst.width),
            np.floor(np.asarray(c)).astype(np.int64).reshape(dst.height, dst.width))


def sample_nearest(raster: EmbeddingRaster, dst: Grid) -> np.ndarray:
    """Float32 (64, h, w) embeddings of ``raster`` on ``dst``; NaN where it has no data."""
    out = np.full((aef.N_BANDS, dst.height, dst.width), np.nan, dtype=np.float32)
    rows, cols = source_pixels(raster.grid, dst)
    _fill(raster, rows, cols, out, (slice(0, dst.height), slice(0, dst.width)))
    return out


def _fill(raster: EmbeddingRaster, rows: np.ndarray, cols: np.ndarray, out: np.ndarray,
          part: tuple[slice, slice]) -> None:
    r, c = rows[part], cols[part]
    inside = (r >= 0) & (r < raster.height) & (c >= 0) & (c < raster.width)
    if not inside.any():
        return
    r0, r1, c0, c1 = r[inside].min(), r[inside].max() + 1, c[inside].min(), c[inside].max() + 1
    if (r1 - r0) * (c1 - c0) > MAX_SOURCE_PIXELS and r.size > 1:
        ys, xs = part
        ymid, xmid = (ys.start + ys.stop) // 2, (xs.start + xs.stop) // 2
        for sub in ((slice(ys.start, ymid), slice(xs.start, xmid)), (slice(ys.start, ymid), slice(xmid, xs.stop)),
                    (slice(ymid, ys.stop), slice(xs.start, xmid)), (slice(ymid, ys.stop), slice(xmid, xs.stop))):
            if sub[0].stop > sub[0].start and sub[1].stop > sub[1].start:
                _fill(raster, rows, cols, out, sub)
        return
    block = raster.read(Window(int(c0), int(r0), int(c1 - c0), int(r1 - r0)))
    target = out[:, part[0], part[1]]
    target[:, inside] = block[:, r[inside] - r0, c[inside] - c0]
