"""The "local" source: clip and nearest-warp of an embeddings raster on disk."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.aoi import AreaOfInterest, aoi_window
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import estimate, fetch
from alphaearth_height.plugin.core.cancel import Cancelled
from alphaearth_height.plugin.core.rasters import EmbeddingRaster, Grid
from conftest import ORIGIN, UTM, unit_embeddings, write_embeddings


@pytest.fixture(scope="module")
def local_raster(tmp_path_factory):
    values = unit_embeddings(300, 260, seed=3)
    values[:, 40:50, 60:70] = np.nan  # a nodata hole
    path = tmp_path_factory.mktemp("local") / "emb.tif"
    return write_embeddings(path, values, bottom_up=True), aef.quantise(values)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile, ds.tags(), ds.descriptions, ds.transform, ds.crs


def test_clip_matches_direct_read(local_raster, tmp_path):
    path, truth = local_raster
    aoi = AreaOfInterest(ORIGIN[0] + 503, ORIGIN[1] - 1207, ORIGIN[0] + 1796, ORIGIN[1] - 333, UTM)
    aoi_ll = AreaOfInterest(*aoi.bounds_in("EPSG:4326"), "EPSG:4326")
    result = fetch(aoi_ll, 2020, "local", tmp_path / "out.tif", raster=path)
    data, profile, tags, names, transform, crs = _read(result.path)
    with EmbeddingRaster(path) as src:
        window = aoi_window(src.grid, aoi_ll, path)
        direct = aef.quantise(src.read(window))  # north-up, whatever the file's row order
    r0, c0 = int(window.row_off), int(window.col_off)
    assert data.shape == (64, int(window.height), int(window.width))
    assert np.array_equal(data, truth[:, r0:r0 + data.shape[1], c0:c0 + data.shape[2]])
    assert transform == Affine(10, 0, ORIGIN[0] + 10 * c0, 0, -10, ORIGIN[1] - 10 * r0)
    assert profile["dtype"] == "int8" and profile["nodata"] == -128 and crs == CRS.from_string(UTM)
    assert names == aef.BAND_NAMES
    assert tags["ATTRIBUTION"] == aef.ATTRIBUTION and tags["YEAR"] == "2020" and "emb.tif" in tags["SOURCE"]
    assert np.array_equal(data, direct)


def test_warp_to_shifted_grid_is_a_pure_shift(local_raster, tmp_path):
    path, truth = local_raster
    # Grid offset by (+3 m, -4 m): each target centre falls in source pixel (r + 0, c + 0) or (+1)
    grid = Grid(CRS.from_string(UTM), Affine(10, 0, ORIGIN[0] + 403, 0, -10, ORIGIN[1] - 604), 120, 90)
    aoi = AreaOfInterest(*grid.bounds, UTM)
    result = fetch(aoi, 2021, "local", tmp_path / "out.tif", grid=grid, raster=path)
    data = _read(result.path)[0]
    # centre x = ORIGIN + 403 + 10c + 5 -> source col floor((408 + 10c) / 10) = 40 + c
    # centre y = ORIGIN - 604 - 10r - 5 -> source row floor((609 + 10r) / 10) = 60 + r
    assert np.array_equal(data, truth[:, 60:150, 40:160])


def test_warp_to_another_zone_is_nearest(local_raster, tmp_path):
    path, truth = local_raster
    crs31 = CRS.from_epsg(32631)
    with EmbeddingRaster(path) as src:
        bounds = src.grid.bounds
    x0, y0, x1, y1 = transform_bounds(CRS.from_string(UTM), crs31, *bounds)
    grid = Grid(crs31, Affine(20, 0, round(x0) + 200, 0, -20, round(y1) - 300), 60, 60)  # 20 m: decimation too
    result = fetch(AreaOfInterest(*grid.bounds, "EPSG:32631"), 2020, "local", tmp_path / "w.tif", grid=grid,
                   raster=path)
    data = _read(result.path)[0]
    cols, rows = np.meshgrid(np.arange(60) + 0.5, np.arange(60) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    sx, sy = transform_points(crs31, CRS.from_string(UTM), xs, ys)
    c = np.floor((np.array(sx) - ORIGIN[0]) / 10).astype(int)
    r = np.floor((ORIGIN[1] - np.array(sy)) / 10).astype(int)
    inside = (r >= 0) & (r < 300) & (c >= 0) & (c < 260)
    expected = np.full((64, 3600), aef.NODATA_INT8, dtype=np.int8)
    expected[:, inside] = truth[:, r[inside], c[inside]]
    assert inside.mean() > 0.5
    assert np.array_equal(data.reshape(64, -1), expected)


def test_local_errors_and_cancel(local_raster, tmp_path):
    path, _ = local_raster
    aoi = AreaOfInterest(ORIGIN[0] + 100, ORIGIN[1] - 900, ORIGIN[0] + 900, ORIGIN[1] - 100, UTM)
    with pytest.raises(InputError, match="needs an embeddings raster"):
        fetch(aoi, 2020, "local", tmp_path / "o.tif")
    with pytest.raises(InputError, match="would be overwritten"):
        fetch(aoi, 2020, "local", path, raster=path)
    with pytest.raises(InputError, match="is not known"):
        fetch(aoi, 2020, "s3", tmp_path / "o.tif")
    with pytest.raises(InputError, match="outside the AlphaEarth years"):
        fetch(aoi, 1999, "local", tmp_path / "o.tif", raster=path)
    far = AreaOfInterest(0, 0, 1000, 1000, UTM)
    with pytest.raises(InputError, match="does not overlap"):
        fetch(far, 2020, "local", tmp_path / "o.tif", raster=path)
    with pytest.raises(Cancelled):
        fetch(aoi, 2020, "local", tmp_path / "o.tif", raster=path, cancel=lambda: True)
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    info = estimate(aoi, 2020, "local", raster=path)
    assert (info["width"], info["height"], info["requests"]) == (80, 80, 0)
