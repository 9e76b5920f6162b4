"""The "cog" source against a real HTTP server on 127.0.0.1 serving AEF-like COGs
(tests/range_server.py: two of them either side of the UTM 30/31 boundary at 0° longitude)."""

from __future__ import annotations

import filecmp
import urllib.error
import urllib.request

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import cache_size, clear_cache, estimate, fetch
from alphaearth_height.plugin.core.fetch import cog as cog_module
from alphaearth_height.plugin.core.fetch.tiling import output_grid
from alphaearth_height.plugin.core.inference import Cancelled
from range_server import PREFIX, RangeServer, ServerLog, build_mirror, expected_output


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    return root, build_mirror(root)


@pytest.fixture
def server(mirror):
    """A fresh server (new port, so GDAL's in-process HTTP cache cannot answer for it)."""
    root, cogs = mirror
    with RangeServer(root) as srv:
        yield srv, cogs, f"{srv.url}/{PREFIX}"


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
