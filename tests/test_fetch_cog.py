"""The "cog" source against a real HTTP server on 127.0.0.1 serving AEF-like COGs.

The fixture COGs are written like the public ones: int8, 64 bands A00..A63, nodata
-128, stored bottom-up (positive y pixel size), internally tiled with overviews. Two of
them sit either side of the UTM 30/31 boundary at 0° longitude.
"""

from __future__ import annotations

import csv
import filecmp
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.shutil import copy as copy_raster
from rasterio.warp import transform as transform_points

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import cache_size, clear_cache, estimate, fetch
from alphaearth_height.plugin.core.fetch import cog as cog_module
from alphaearth_height.plugin.core.fetch.tiling import output_grid
from alphaearth_height.plugin.core.inference import Cancelled
from range_server import RangeServer, ServerLog

SIZE = 512
PREFIX = "tge-labs/aef/v1/annual"
S3 = "s3://us-west-2.opendata.source.coop/" + PREFIX
COLUMNS = ["WKT", "crs", "year", "utm_zone", "utm_west", "utm_south", "utm_east", "utm_north",
           "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north", "path"]


def smooth_field(seed: int) -> np.ndarray:
    """North-up unit-length embeddings (64, SIZE, SIZE), quantised like AEF."""
    k = np.arange(64, dtype=np.float32)[:, None, None]
    x = np.arange(SIZE, dtype=np.float32)[None, None, :]
    y = np.arange(SIZE, dtype=np.float32)[None, :, None]
    a, b = 0.02 * (k % 7 + 1) * x, 0.015 * (k % 3 + 1) * y + k * seed
    v = np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)  # cos(a + b), separably
    return aef.quantise(v / np.linalg.norm(v, axis=0, keepdims=True))


class Cog:
    def __init__(self, root: Path, year: int, epsg: int, left: float, bottom: float, seed: int, name: str) -> None:
        self.crs = CRS.from_epsg(epsg)
        self.left, self.bottom, self.top = left, bottom, bottom + SIZE * 10
        self.truth = smooth_field(seed)  # north-up, int8
        if seed == 1:
            self.truth[:, 300:310, 100:140] = aef.NODATA_INT8  # a nodata hole (all bands)
        zone = f"{epsg - 32600}N"
        self.rel = f"{year}/{zone}/{name}-0000000000-0000000000.tiff"
        self.path = root / PREFIX / self.rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        bottom_up = Affine(10, 0, left, 0, 10, bottom)
        profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "count": 64, "dtype": "int8",
                   "crs": self.crs, "transform": bottom_up, "nodata": aef.NODATA_INT8}
        with rasterio.MemoryFile() as mem:
            with mem.open(**profile) as ds:
                ds.write(self.truth[:, ::-1, :])
                for i, band in enumerate(aef.BAND_NAMES, start=1):
                    ds.set_band_description(i, band)
            with mem.open() as ds:
                copy_raster(ds, self.path, driver="COG", BLOCKSIZE=128, COMPRESS="DEFLATE", PREDICTOR="YES",
                            OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="NEAREST")
        self.row = self._row(year, zone)

    def _row(self, year: int, zone: str) -> dict:
        xs = [self.left, self.left + SIZE * 10]
        ys = [self.bottom, self.top]
        lon, lat = transform_points(self.crs, "EPSG:4326", [xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
        ring = ", ".join(f"{a} {b}" for a, b in zip(lon + lon[:1], lat + lat[:1]))
        return {"WKT": f"POLYGON (({ring}))", "crs": f"EPSG:{self.crs.to_epsg()}", "year": year, "utm_zone": zone,
                "utm_west": xs[0], "utm_south": ys[0], "utm_east": xs[1], "utm_north": ys[1],
                "wgs84_west": min(lon), "wgs84_south": min(lat), "wgs84_east": max(lon), "wgs84_north": max(lat),
                "path": f"{S3}/{self.rel}"}

    def value_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest truth (64, n) at points in this COG's CRS and whether each has data."""
        c = np.floor((x - self.left) / 10).astype(int)
        r = np.floor((self.top - y) / 10).astype(int)
        inside = (c >= 0) & (c < SIZE) & (r >= 0) & (r < SIZE)
        values = np.full((64, x.size), aef.NODATA_INT8, dtype=np.int8)
        values[:, inside] = self.truth[:, r[inside], c[inside]]
        return values, values[0] != aef.NODATA_INT8


def _snap(v: float) -> float:
    return float(np.floor(v / 10) * 10)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    (x30,), (y30,) = transform_points("EPSG:4326", "EPSG:32630", [0.0], [45.01])
    (x31,), (y31,) = transform_points("EPSG:4326", "EPSG:32631", [0.0], [45.01])
    cogs = {
        # zone 30 tile overhangs 0° by ~1 km, with a nodata hole inside
        "w": Cog(root, 2020, 32630, _snap(x30) - 4120, _snap(y30) - 2560, 1, "xw30"),
        "e": Cog(root, 2020, 32631, _snap(x31) - 1000, _snap(y31) - 2570, 2, "xe31"),
        "far": Cog(root, 2020, 32630, 500_000.0, 4_000_000.0, 3, "xfar"),
        "w2021": Cog(root, 2021, 32630, _snap(x30) - 4120, _snap(y30) - 2560, 4, "xw30b"),
    }
    index = root / PREFIX / "aef_index.csv"
    with open(index, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for cog in cogs.values():
            writer.writerow(cog.row)
    return root, cogs


@pytest.fixture
def server(mirror):
    """A fresh server (new port, so GDAL's in-process HTTP cache cannot answer for it)."""
    root, cogs = mirror
    with RangeServer(root) as srv:
        yield srv, cogs, f"{srv.url}/{PREFIX}"


def expected_output(grid, cogs: list[Cog]) -> np.ndarray:
    """Per pixel: the first COG (in order) with data under the pixel centre, nearest."""
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    out = np.full((64, xs.size), aef.NODATA_INT8, dtype=np.int8)
    filled = np.zeros(xs.size, dtype=bool)
    for cog in cogs:
        px, py = (np.asarray(v) for v in transform_points(grid.crs, cog.crs, xs, ys))
        values, ok = cog.value_at(px, py)
        take = ok & ~filled
        out[:, take] = values[:, take]
        filled |= take
    return out.reshape(64, grid.height, grid.width)


def _tiff_requests(log: ServerLog) -> list:
    return [r for r in log.requests if r[1].endswith(".tiff")]


def test_aoi_across_utm_zones(server, tmp_path):
    srv, cogs, base = server
    aoi = AreaOfInterest(-0.04, 45.0, 0.035, 45.02, "EPSG:4326")
    grid = output_grid(aoi)
    assert grid.crs.to_epsg() == 32630
    result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "cache", base_url=base,
                   tile_size=256, retry_delay=0.05)
    with rasterio.open(result.path) as ds:
        data, tags = ds.read(), ds.tags()
        assert ds.transform == grid.transform and ds.crs == grid.crs and ds.descriptions == aef.BAND_NAMES
    expected = expected_output(grid, [cogs["w"], cogs["e"]])
    assert np.array_equal(data, expected)  # exact int8: de-quantisation and re-quantisation agree
    # both zones contributed, the hole in the west tile was filled from the east one where it overlaps
    west_only = expected_output(grid, [cogs["w"]])[0] != aef.NODATA_INT8
    east_only = expected_output(grid, [cogs["e"]])[0] != aef.NODATA_INT8
    assert west_only.sum() > 1000 and (east_only & ~west_only).sum() > 1000
    assert (data[0] == aef.NODATA_INT8).sum() < data[0].size  # mostly covered
    assert tags["ATTRIBUTION"] == aef.ATTRIBUTION and tags["YEAR"] == "2020" and base in tags["SOURCE"]
    # every request carried our User-Agent; the far tile and the 2021 tile were never touched
    assert all(agent.startswith("alphaearth-height/") for _, _, _, agent in srv.log.requests)
    touched = {path for _, path, _, _ in _tiff_requests(srv.log)}
    assert touched == {f"/{PREFIX}/{cogs['w'].rel}", f"/{PREFIX}/{cogs['e'].rel}"}


def test_default_urllib_agent_is_refused_but_ours_works(server, tmp_path):
    srv, cogs, base = server
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/aef_index.csv", timeout=10)
    assert err.value.code == 403
    aoi = AreaOfInterest(cogs["w"].left + 1000, cogs["w"].bottom + 1000, cogs["w"].left + 2000,
                         cogs["w"].bottom + 2000, "EPSG:32630")
    result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base)
    assert result.valid_fraction == 1.0
    index_gets = [r for r in srv.log.requests if r[1].endswith("aef_index.csv")]
    assert index_gets[0][3].startswith("Python-urllib") and index_gets[-1][3].startswith("alphaearth-height/")


def test_small_aoi_reads_a_small_fraction_by_ranges(server, tmp_path):
    srv, cogs, base = server
    w = cogs["w"]
    # inside internal block (row 1, col 1) of the west COG: 1280-2560 m from its north-west corner
    aoi = AreaOfInterest(w.left + 1400, w.top - 2400, w.left + 2400, w.top - 1400, "EPSG:32630")
    result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base)
    grid = output_grid(aoi)
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), expected_output(grid, [w]))
    served = srv.log.bytes_served[f"/{PREFIX}/{w.rel}"]
    assert served < 0.15 * w.path.stat().st_size
    assert all(rng and rng.startswith("bytes=") for method, _, rng, _ in _tiff_requests(srv.log) if method == "GET")


@pytest.mark.parametrize("drops", [1, 8])
def test_dropped_connections_are_retried(server, tmp_path, monkeypatch, drops):
    """One drop is absorbed by GDAL; a burst surfaces as read errors that our loop retries."""
    srv, cogs, base = server
    errors = []
    real = cog_module._transient
    monkeypatch.setattr(cog_module, "_transient", lambda exc: errors.append(exc) or real(exc))
    srv.drops_left = drops
    aoi = AreaOfInterest(-0.03, 45.002, 0.02, 45.015, "EPSG:4326")
    result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base, workers=1,
                   retry_delay=0.05)
    assert srv.log.drops == drops and (drops == 1 or errors)
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), expected_output(output_grid(aoi), [cogs["w"], cogs["e"]]))


def test_cache_second_run_and_resume(server, tmp_path):
    srv, cogs, base = server
    aoi = AreaOfInterest(-0.035, 45.0, 0.01, 45.018, "EPSG:4326")
    opts = dict(base_url=base, tile_size=128, workers=2, retry_delay=0.05)
    reference = fetch(aoi, 2020, "cog", tmp_path / "ref.tif", cache_dir=tmp_path / "c1", **opts)
    info = estimate(aoi, 2020, "cog", cache_dir=tmp_path / "c1", **opts)
    assert info["tiles_cached"] == info["tiles"] == reference.tiles and info["requests"] == 0 and info["files"] == 2
    srv.log = ServerLog()
    again = fetch(aoi, 2020, "cog", tmp_path / "again.tif", cache_dir=tmp_path / "c1", **opts)
    assert srv.log.requests == [] and again.fetched == 0  # index and tiles from the cache
    assert filecmp.cmp(reference.path, again.path, shallow=False)

    progress = []
    with pytest.raises(Cancelled):
        fetch(aoi, 2020, "cog", tmp_path / "out.tif", cache_dir=tmp_path / "c2",
              progress=lambda d, t: progress.append(d), cancel=lambda: len(progress) > 3, **opts)
    assert not (tmp_path / "out.tif").exists() and not list((tmp_path / "c2").rglob("*.partial*"))
    resumed = fetch(aoi, 2020, "cog", tmp_path / "out.tif", cache_dir=tmp_path / "c2", **opts)
    assert 3 <= resumed.from_cache < resumed.tiles and resumed.fetched == resumed.tiles - resumed.from_cache
    assert filecmp.cmp(reference.path, resumed.path, shallow=False)

    assert cache_size(tmp_path / "c2") > 0
    assert clear_cache(tmp_path / "c2") > 0 and cache_size(tmp_path / "c2") == 0


def test_year_and_coverage_errors(server, tmp_path):
    srv, cogs, base = server
    aoi = AreaOfInterest(10.0, 10.0, 10.01, 10.01, "EPSG:4326")
    with pytest.raises(InputError, match="not covered by any AlphaEarth COG for 2020"):
        fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base)
    w = cogs["w2021"]
    aoi = AreaOfInterest(w.left + 100, w.bottom + 100, w.left + 600, w.bottom + 600, "EPSG:32630")
    result = fetch(aoi, 2021, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base)
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), expected_output(output_grid(aoi), [w]))
    with pytest.raises(InputError, match="HTTP 404"):
        fetch(aoi, 2021, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c3", base_url=base + "/nothing")
