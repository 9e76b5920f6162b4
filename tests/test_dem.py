"""The Copernicus DEM terrain source against a real HTTP server on 127.0.0.1 serving a mirror
laid out like the public buckets (tests/dem_mirror.py; heights bilinear in lon/lat, so
bilinear resampling reproduces them exactly and a misregistration shows)."""

from __future__ import annotations

import filecmp
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as transform_points

from alphaearth_height.plugin.core import dem
from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.cancel import Cancelled
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import cache_size, clear_cache
from alphaearth_height.plugin.core.fetch.copernicus import (aoi_grid, cells_for, fetch_terrain, tile_name,
                                                            tile_url)
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA, grow_grid
from dem_mirror import ROWS, build_dem_mirror, columns, height, tile_file
from range_server import Fault, RangeServer, ServerLog

GLO30, GLO90 = dem.PRODUCTS["copernicus-30"], dem.PRODUCTS["copernicus-90"]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("dem_mirror")
    return root, build_dem_mirror(root)


@pytest.fixture
def server(mirror):
    root, buckets = mirror
    with RangeServer(root) as srv:
        yield srv, root, {key: f"{srv.url}/{bucket}" for key, bucket in buckets.items()}


def lonlat_of_pixels(grid):
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    lon, lat = transform_points(grid.crs, "EPSG:4326", xs, ys)
    return np.asarray(lon).reshape(cols.shape), np.asarray(lat).reshape(cols.shape)


def read(path):
    """Heights, tags and georeferencing (crs, transform, width, height) of a written terrain."""
    with rasterio.open(path) as ds:
        return ds.read(1), ds.tags(), SimpleNamespace(crs=ds.crs, transform=ds.transform, width=ds.width,
                                                      height=ds.height)


def dem_requests(log: ServerLog) -> list:
    return [r for r in log.requests if r[1].endswith("_DEM.tif")]


def test_tile_names_and_layout():
    assert tile_name(GLO30, 44, -1) == "Copernicus_DSM_COG_10_N44_00_W001_00_DEM"
    assert tile_name(GLO90, 44, -1) == "Copernicus_DSM_COG_30_N44_00_W001_00_DEM"
    assert tile_name(GLO30, -34, 151) == "Copernicus_DSM_COG_10_S34_00_E151_00_DEM"
    assert tile_name(GLO30, 0, 0) == "Copernicus_DSM_COG_10_N00_00_E000_00_DEM"
    assert tile_name(GLO30, -1, -180) == "Copernicus_DSM_COG_10_S01_00_W180_00_DEM"
    name = tile_name(GLO30, 44, -1)
    assert tile_url("https://copernicus-dem-30m.s3.amazonaws.com/", name) == (
        f"https://copernicus-dem-30m.s3.amazonaws.com/{name}/{name}.tif")
    assert GLO30.base_url() == "https://copernicus-dem-30m.s3.amazonaws.com"
    assert GLO90.base_url() == "https://copernicus-dem-90m.s3.amazonaws.com"
    # an area in the middle of a cell needs that cell only; one across a corner needs four
    assert cells_for((-0.6, 44.4, -0.5, 44.5), GLO30) == [(44, -1)]
    assert sorted(cells_for((-0.1, 44.9, 0.1, 45.1), GLO30)) == [(44, -1), (44, 0), (45, -1), (45, 0)]


def test_base_url_from_environment(monkeypatch):
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_COPERNICUS_90_URL", "http://127.0.0.1:9/mirror/")
    assert GLO90.base_url() == "http://127.0.0.1:9/mirror"
    assert GLO90.base_url("http://other/") == "http://other"  # an explicit URL wins
    assert GLO30.base_url() == GLO30.default_url


def test_area_across_a_degree_boundary(server, tmp_path):
    srv, root, base = server
    aoi = AreaOfInterest(-0.02, 44.49, 0.02, 44.51, "EPSG:4326")
    grid = aoi_grid(aoi, 10.0)
    result = fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"],
                           cache_dir=tmp_path / "cache")
    values, tags, ds = read(result.path)
    assert ds.crs == grid.crs and ds.transform == grid.transform and (ds.width, ds.height) == (grid.width, grid.height)
    lon, lat = lonlat_of_pixels(grid)
    assert (lon < 0).any() and (lon > 0).any()  # both cells contribute
    np.testing.assert_allclose(values, height(lon, lat), atol=0.01)
    assert result.resampling == "bilinear" and result.valid_fraction == 1.0 and not result.absent
    assert tags["ATTRIBUTION"] == dem.ATTRIBUTION and "DLR e.V. 2010-2014" in tags["ATTRIBUTION"]
    assert tags["VERTICAL_DATUM"] == "EGM2008 geoid" and tags["TERRAIN_PRODUCT"] == "copernicus-30"
    assert tags["COPERNICUS_TILES"].split(",") == [tile_name(GLO30, 44, -1), tile_name(GLO30, 44, 0)]
    assert base["copernicus-30"] in tags["SOURCE"] and tags["COPERNICUS_ABSENT_TILES"] == "none"
    # range requests only, with our User-Agent, and a fraction of each file
    gets = [r for r in dem_requests(srv.log) if r[0] == "GET"]
    assert gets and all(rng and rng.startswith("bytes=") for _, _, rng, _ in gets)
    assert all(agent.startswith("alphaearth-height/") for _, _, _, agent in dem_requests(srv.log))
    for lon0 in (-1, 0):
        path = tile_file(root, "copernicus-30", 44, lon0)
        served = srv.log.bytes_served[f"/{path.relative_to(root).as_posix()}"]
        print(f"{path.name}: {served} of {path.stat().st_size} bytes served")
        assert served < 0.35 * path.stat().st_size, (served, path.stat().st_size)


def test_sea_cell_is_zero_and_second_run_reads_nothing(server, tmp_path):
    srv, root, base = server
    aoi = AreaOfInterest(-0.03, 44.97, 0.03, 45.03, "EPSG:4326")  # the four cells around (0°, 45° N)
    grid = aoi_grid(aoi, 10.0)
    opts = dict(base_url=base["copernicus-30"], cache_dir=tmp_path / "cache")
    first = fetch_terrain(grid, tmp_path / "a.tif", GLO30, **opts)
    values, tags, _ = read(first.path)
    lon, lat = lonlat_of_pixels(grid)
    sea = (lat > 45) & (lon >= 0)
    px = 1 / ROWS["copernicus-30"]
    near_seam = (np.abs(lat - 45) < px) & (lon > -px) | (np.abs(lon) < px) & (lat > 45 - px)
    assert (values[sea & ~near_seam] == 0).all()
    land = ~sea & ~near_seam
    np.testing.assert_allclose(values[land], height(lon, lat)[land], atol=0.01)
    assert first.absent == [tile_name(GLO30, 45, 0)] and first.valid_fraction == 1.0
    assert tags["COPERNICUS_ABSENT_TILES"] == tile_name(GLO30, 45, 0) and "open sea" in tags["SEA"]
    assert len(first.cells) == 3
    # the second run: blocks, tile descriptions and the sea cell come from the cache
    srv.log = ServerLog()
    second = fetch_terrain(grid, tmp_path / "b.tif", GLO30, **opts)
    assert srv.log.requests == [] and second.blocks_fetched == 0 and second.blocks_cached == first.blocks_fetched
    assert filecmp.cmp(first.path, second.path, shallow=False)
    # the DEM's cache is part of the cache that cache_size and clear_cache manage
    assert cache_size(tmp_path / "cache") > 0 and clear_cache(tmp_path / "cache") > 0
    assert not (tmp_path / "cache" / "copernicus").exists()


def test_narrower_tiles_at_55_north(server, tmp_path):
    srv, root, base = server
    assert columns("copernicus-30", 55) == 480 and columns("copernicus-30", 44) == 720
    aoi = AreaOfInterest(-0.03, 55.49, 0.03, 55.51, "EPSG:4326")
    grid = aoi_grid(aoi, 10.0)
    result = fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"],
                           cache_dir=tmp_path / "cache")
    values, _, ds = read(result.path)
    lon, lat = lonlat_of_pixels(grid)
    assert ds.transform == grid.transform and (lon < 0).any() and (lon > 0).any()
    np.testing.assert_allclose(values, height(lon, lat), atol=0.01)  # assuming as many columns as rows would be km off
    info = (tmp_path / "cache" / "copernicus" / "GLO-30" / tile_name(GLO30, 55, 0) / "tile.json").read_text()
    assert '"width": 480' in info and '"height": 720' in info


def test_across_a_latitude_where_tiles_narrow(server, tmp_path):
    """49° N cells have 720 columns, 50° N cells 480: two pixel sizes, warped one after the other."""
    srv, root, base = server
    aoi = AreaOfInterest(0.3, 49.98, 0.32, 50.02, "EPSG:4326")
    grid = aoi_grid(aoi, 10.0)
    result = fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"],
                           cache_dir=tmp_path / "cache")
    values, _, _ = read(result.path)
    lon, lat = lonlat_of_pixels(grid)
    expected = height(lon, lat)
    px = 1 / ROWS["copernicus-30"]
    seam = np.abs(lat - 50) < px
    np.testing.assert_allclose(values[~seam], expected[~seam], atol=0.01)
    # at the seam each side uses its own tile's edge rows: off by at most the slope over half a pixel
    slope = 150 + 300 * (lon[seam] + 1)
    assert (np.abs(values[seam] - expected[seam]) <= slope * px / 2 + 0.01).all()
    assert sorted(result.cells) == [tile_name(GLO30, 49, 0), tile_name(GLO30, 50, 0)]


def test_averaging_onto_coarser_pixels_and_glo90(server, tmp_path):
    srv, root, base = server
    aoi = AreaOfInterest(-0.3, 44.3, -0.1, 44.45, "EPSG:4326")
    grid = aoi_grid(aoi, 2000.0)  # 2 km pixels: many 10" DEM pixels each
    result = fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"],
                           cache_dir=tmp_path / "cache")
    values, tags, _ = read(result.path)
    lon, lat = lonlat_of_pixels(grid)
    assert result.resampling == "average" and tags["RESAMPLING"] == "average"
    np.testing.assert_allclose(values, height(lon, lat), atol=3.0)  # the footprint's mean ~ its centre's value
    fine = aoi_grid(aoi, 10.0)
    result = fetch_terrain(fine, tmp_path / "t90.tif", GLO90, base_url=base["copernicus-90"],
                           cache_dir=tmp_path / "cache")
    values, tags, _ = read(result.path)
    lon, lat = lonlat_of_pixels(fine)
    np.testing.assert_allclose(values, height(lon, lat), atol=0.01)
    assert tags["TERRAIN_PRODUCT"] == "copernicus-90" and result.cells == [tile_name(GLO90, 44, -1)]
    assert any("Copernicus_DSM_COG_30_N44_00_W001_00_DEM" in r[1] for r in dem_requests(srv.log))


def test_all_sea_or_wrong_base_url_is_one_line(server, tmp_path):
    srv, root, base = server
    sea = aoi_grid(AreaOfInterest(0.4, 45.4, 0.45, 45.45, "EPSG:4326"), 10.0)
    with pytest.raises(InputError, match="has no Copernicus DEM GLO-30 tile at .*open sea, or a wrong base URL"):
        fetch_terrain(sea, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"], cache_dir=tmp_path / "c")
    land = aoi_grid(AreaOfInterest(-0.5, 44.5, -0.49, 44.51, "EPSG:4326"), 10.0)
    with pytest.raises(InputError, match="wrong base URL") as err:
        fetch_terrain(land, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"] + "/nothing",
                      cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value) and not (tmp_path / "t.tif").exists()
    # the absent markers of the wrong URL do not stop the right one
    fetch_terrain(land, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"], cache_dir=tmp_path / "c")


def test_refused_tile_is_an_error_not_sea(mirror, tmp_path):
    root, buckets = mirror
    name = tile_name(GLO30, 44, -1)
    with RangeServer(root, faults=[Fault(f"{name}.tif", "status", status=403)]) as srv:
        grid = aoi_grid(AreaOfInterest(-0.5, 44.5, -0.49, 44.51, "EPSG:4326"), 10.0)
        with pytest.raises(InputError, match=r"could not be read \(HTTP 403\)") as err:
            fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=f"{srv.url}/{buckets['copernicus-30']}",
                          cache_dir=tmp_path / "c", retry_delay=0.01)
    assert "\n" not in str(err.value) and not (tmp_path / "t.tif").exists()
    assert not list((tmp_path / "c").rglob("absent/*/*"))  # a refusal is not remembered as sea


def test_cancel_leaves_no_output(server, tmp_path):
    srv, root, base = server
    grid = aoi_grid(AreaOfInterest(-0.03, 44.97, 0.03, 45.03, "EPSG:4326"), 10.0)
    steps = []
    with pytest.raises(Cancelled):
        fetch_terrain(grid, tmp_path / "t.tif", GLO30, base_url=base["copernicus-30"], cache_dir=tmp_path / "c",
                      progress=lambda done, total: steps.append(done), cancel=lambda: len(steps) >= 1)
    assert not (tmp_path / "t.tif").exists() and not list(tmp_path.glob(".*partial*"))


def test_resolve_terrain_names_a_cached_file_on_the_grid(server, tmp_path, monkeypatch):
    srv, root, base = server
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_COPERNICUS_30_URL", base["copernicus-30"])
    grid = aoi_grid(AreaOfInterest(-0.52, 44.5, -0.5, 44.51, "EPSG:4326"), 10.0)
    path = dem.resolve_terrain("copernicus-30", grid, cache_dir=tmp_path / "c")
    assert path.parent == tmp_path / "c" / "copernicus" / "grids"
    values, tags, ds = read(path)
    grown = grow_grid(grid, dem.MARGIN_PX)
    assert ds.transform == grown.transform and (ds.width, ds.height) == (grown.width, grown.height)
    lon, lat = lonlat_of_pixels(grown)
    np.testing.assert_allclose(values, height(lon, lat), atol=0.01)
    assert (values != OUTPUT_NODATA).all() and tags["ATTRIBUTION"] == dem.ATTRIBUTION
    srv.log = ServerLog()
    assert dem.resolve_terrain("Copernicus-30", grid, cache_dir=tmp_path / "c") == path
    assert srv.log.requests == []
    assert dem.resolve_terrain("some/file.tif", grid) == type(path)("some/file.tif")
    assert dem.resolve_terrain(None, grid) is None
    with pytest.raises(InputError, match="is unknown"):
        dem.product("copernicus-10")
