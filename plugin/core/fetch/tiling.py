"""The output grid of a fetch and its split into tiles.

Tiles sit on a lattice anchored at the CRS origin (multiples of ``size`` pixels), so
two overlapping areas in the same zone share the interior tiles of the cache instead
of each fetching its own, slightly shifted copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from ..aoi import AreaOfInterest, work_crs
from ..errors import InputError
from ..rasters import Grid, check_projected

RESOLUTION = 10.0


@dataclass(frozen=True)
class Tile:
    """One piece of the output grid: its window there and its own grid."""

    window: Window
    grid: Grid


def output_grid(aoi: AreaOfInterest, grid: Grid | None = None) -> Grid:
    """The caller's grid, or a 10 m north-up grid over the AOI in its UTM zone.

    The default grid is snapped outwards to whole 10 m multiples, which is the AEF
    pixel lattice, so the embeddings are copied rather than resampled.
    """
    if grid is not None:
        check_projected("output grid", grid.crs, grid.transform)
        if grid.transform.a <= 0 or grid.transform.e >= 0 or grid.width < 1 or grid.height < 1:
            raise InputError("output grid", "is not a north-up grid with at least one pixel",
                             "Give a grid with positive x and negative y pixel size")
        return grid
    crs = work_crs(aoi)
    xmin, ymin, xmax, ymax = aoi.bounds_in(crs)
    x0, y1 = math.floor(xmin / RESOLUTION) * RESOLUTION, math.ceil(ymax / RESOLUTION) * RESOLUTION
    x1, y0 = math.ceil(xmax / RESOLUTION) * RESOLUTION, math.floor(ymin / RESOLUTION) * RESOLUTION
    return Grid(CRS.from_user_input(crs), Affine(RESOLUTION, 0.0, x0, 0.0, -RESOLUTION, y1),
                max(1, round((x1 - x0) / RESOLUTION)), max(1, round((y1 - y0) / RESOLUTION)))


def _lattice_offset(coordinate: float, resolution: float) -> int:
    """Global pixel index of the grid's first pixel, or 0 when it is off the lattice."""
    index = coordinate / resolution
    return round(index) if abs(index - round(index)) < 1e-6 else 0


def _starts(length: int, offset: int, size: int) -> list[int]:
    first = (-offset) % size or size
    return [0] + list(range(first, length, size))


def plan_tiles(grid: Grid, size: int) -> list[Tile]:
    """Row-major tiles of at most ``size`` x ``size`` px covering the grid exactly once."""
    res_x, res_y = grid.resolution
    cols = _starts(grid.width, _lattice_offset(grid.transform.c, res_x), size)
    rows = _starts(grid.height, _lattice_offset(-grid.transform.f, res_y), size)
    tiles = []
    for r, row in enumerate(rows):
        height = (rows[r + 1] if r + 1 < len(rows) else grid.height) - row
        for c, col in enumerate(cols):
            width = (cols[c + 1] if c + 1 < len(cols) else grid.width) - col
            window = Window(col, row, width, height)
            tiles.append(Tile(window, Grid(grid.crs, grid.window_transform(window), width, height)))
    return tiles
