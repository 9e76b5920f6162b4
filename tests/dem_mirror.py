"""A small Copernicus DEM mirror for tests, laid out like the public buckets, served by
tests/range_server.py on 127.0.0.1.

``{root}/{bucket}/{tile}/{tile}.tif``: EPSG:4326 float32 COGs with overviews, internally
tiled, pixel-is-point like the published files (the top row on the cell's north edge,
the first column on its west edge). They are smaller than the real ones (GLO-30 here has
720 rows per degree, 5" pixels; the code must read sizes from the files), and narrower
above 50° N (two thirds of the columns, as published). Heights are a bilinear function
of lon/lat (``height``), so a bilinear resampling of them is exact and any
misregistration shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.shutil import copy as copy_raster

from alphaearth_height.plugin.core.dem import PRODUCTS
from alphaearth_height.plugin.core.fetch.copernicus import tile_name

BUCKETS = {"copernicus-30": "copernicus-dem-30m", "copernicus-90": "copernicus-dem-90m"}
ROWS = {"copernicus-30": 720, "copernicus-90": 240}  # rows per degree (the real ones: 3600 and 1200)
BLOCK = {"copernicus-30": 128, "copernicus-90": 128}  # the COG driver's smallest
# cells (south-west corners) in the mirror; N45 E000 is left out: open sea
CELLS = [(44, -1), (44, 0), (45, -1), (55, -1), (55, 0), (49, 0), (50, 0)]
SEA = (45, 0)


def height(lon, lat):
    """The mirror's heights (m): bilinear in lon/lat, 100 m to a few thousand over the cells."""
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    return 100.0 + 2000.0 * (lon + 1.0) + 150.0 * (lat - 44.0) + 300.0 * (lon + 1.0) * (lat - 44.0)


def columns(key: str, lat: int) -> int:
    """Columns per degree: the rows, or two thirds of them from 50° on (as the published tiles)."""
    return ROWS[key] if abs(lat + 0.5) < 50 else ROWS[key] * 2 // 3


def write_tile(path: Path, key: str, lat: int, lon: int) -> None:
    rows, cols = ROWS[key], columns(key, lat)
    dx, dy = 1.0 / cols, 1.0 / rows
    # pixel centres: lon + i*dx (i = 0..cols-1), lat + 1 - j*dy (j = 0..rows-1)
    lons = lon + np.arange(cols) * dx
    lats = lat + 1 - np.arange(rows) * dy
    values = height(lons[None, :], lats[:, None]).astype(np.float32)
    transform = Affine(dx, 0, lon - dx / 2, 0, -dy, lat + 1 + dy / 2)
    profile = {"driver": "GTiff", "width": cols, "height": rows, "count": 1, "dtype": "float32",
               "crs": "EPSG:4326", "transform": transform}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(values, 1)
            ds.update_tags(AREA_OR_POINT="Point")
        with mem.open() as ds:
            copy_raster(ds, path, driver="COG", BLOCKSIZE=BLOCK[key], COMPRESS="DEFLATE", PREDICTOR="YES",
                        OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="AVERAGE")
    with rasterio.open(path) as ds:  # the georeferencing GDAL reports is the one the code will see
        assert ds.transform.almost_equals(transform, precision=1e-12), (ds.transform, transform)
        assert ds.overviews(1) and ds.block_shapes[0] == (BLOCK[key], BLOCK[key])


def build_dem_mirror(root: Path, keys=("copernicus-30", "copernicus-90")) -> dict[str, str]:
    """Write the mirror under ``root``; the bucket folder of each product (relative to root)."""
    for key in keys:
        for lat, lon in CELLS:
            name = tile_name(PRODUCTS[key], lat, lon)
            write_tile(root / BUCKETS[key] / name / f"{name}.tif", key, lat, lon)
    return {key: BUCKETS[key] for key in keys}


def tile_file(root: Path, key: str, lat: int, lon: int) -> Path:
    name = tile_name(PRODUCTS[key], lat, lon)
    return root / BUCKETS[key] / name / f"{name}.tif"
