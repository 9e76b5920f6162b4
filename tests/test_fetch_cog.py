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
from alphaearth_height.plugin.core.cancel import Cancelled
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


def _cached_tiles(cache) -> list:
    return sorted((cache / "cog").rglob("*x*.tif"))


@pytest.mark.parametrize("damage", ["garbage", "pixels changed", "no checksum", "truncated"])
def test_damaged_cached_tile_is_fetched_again(server, mirror, tmp_path, damage):
    """A cached tile that fails its check is deleted and fetched again, never written as nodata."""
    srv, cogs, base = server
    w = cogs["w"]
    aoi = AreaOfInterest(w.left + 1000, w.bottom + 1000, w.left + 2000, w.bottom + 2000, "EPSG:32630")
    first = fetch(aoi, 2020, "cog", tmp_path / "a.tif", cache_dir=tmp_path / "c", base_url=base)
    tile = _cached_tiles(tmp_path / "c")[0]
    if damage == "garbage":
        tile.write_bytes(b"garbage\n" * 100)
    elif damage == "truncated":
        tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])
    else:  # a readable GeoTIFF whose pixels are not what was fetched, or from before checksums
        with rasterio.open(tile, "r+") as ds:
            if damage == "pixels changed":
                values = ds.read()
                values[:, 10:20, 10:20] = 0
                ds.write(values)
            else:
                ds.update_tags(AEH_SHA256="")
    root, _ = mirror
    with RangeServer(root) as fresh:  # a new port: GDAL's in-process cache cannot answer for it
        again = fetch(aoi, 2020, "cog", tmp_path / "b.tif", cache_dir=tmp_path / "c", base_url=f"{fresh.url}/{PREFIX}")
    assert again.damaged == 1 and again.fetched == 1 and again.from_cache == first.tiles - 1
    assert _tiff_requests(fresh.log)  # really fetched again
    with rasterio.open(first.path) as a, rasterio.open(again.path) as b:
        assert np.array_equal(a.read(), b.read())  # (the SOURCE tag names the other port)
    third = fetch(aoi, 2020, "cog", tmp_path / "c.tif", cache_dir=tmp_path / "c", base_url=base)
    assert third.damaged == 0 and third.fetched == 0  # stored again, intact


def test_index_validation(tmp_path):
    from alphaearth_height.plugin.core.fetch.cog_index import index_problem

    header = "WKT,crs,year,utm_zone,utm_west,utm_south,utm_east,utm_north,wgs84_west,wgs84_south,wgs84_east," \
             "wgs84_north,path\n"
    row = '"POLYGON ((0 0, 1 0, 1 1, 0 0))",EPSG:32630,2020,30N,0,0,1,1,0,0,1,1,s3://x/v1/annual/a.tiff\n'
    cases = {"good.csv": (header + row * 3, None), "html.csv": ("<html><body>hi</body></html>\n", "not an AEF"),
             "cut.csv": (header + row * 2 + row[:40], "incomplete row"), "empty.csv": ("", "is empty"),
             "header.csv": (header, "has no rows")}
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        found = index_problem(tmp_path / name)
        assert (found is None) if problem is None else (problem in found), (name, found)


@pytest.mark.parametrize("kind, said", [("cut", "was cut off"), ("status", "HTTP 503")])
def test_index_download_cut_off_or_refused_once_is_retried(mirror, tmp_path, kind, said):
    """A connection dropped mid-index (fewer bytes than its Content-Length) or a 503 is retried;
    what was waited for and why it is retried is said."""
    from range_server import Fault

    root, cogs = mirror
    with RangeServer(root, [Fault("aef_index.csv", kind, status=503, times=1)]) as srv:
        w = cogs["w"]
        aoi = AreaOfInterest(w.left + 1000, w.bottom + 1000, w.left + 1500, w.bottom + 1500, "EPSG:32630")
        messages = []
        result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=f"{srv.url}/{PREFIX}",
                       retry_delay=0.05, status=messages.append)
    assert result.valid_fraction == 1.0
    assert messages[0].startswith("the COG tile index: waiting for 127.0.0.1")
    assert any(said in m and "trying again" in m for m in messages), messages
    assert srv.faults[0].hits == 1


def test_index_download_reports_progress_then_stalls(mirror, tmp_path, monkeypatch):
    """While bytes trickle in, the user hears how much arrived every couple of seconds; under
    1 KB per stall window is a stall, retried until the index deadline."""
    from range_server import Fault

    monkeypatch.setenv("ALPHAEARTH_HEIGHT_STALL_TIMEOUT", "4.5")
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_INDEX_DEADLINE", "5")
    root, cogs = mirror
    w = cogs["w"]
    aoi = AreaOfInterest(w.left + 1000, w.bottom + 1000, w.left + 1500, w.bottom + 1500, "EPSG:32630")
    messages = []
    with RangeServer(root, [Fault("aef_index.csv", "trickle", interval=0.3)]) as srv:
        with pytest.raises(InputError) as err:
            estimate(aoi, 2020, "cog", cache_dir=tmp_path / "c", base_url=f"{srv.url}/{PREFIX}",
                     status=messages.append)
    assert "stalled: less than 1 KB arrived" in err.value.problem and "aef_index.csv" in err.value.subject
    progress = [m for m in messages if "received from 127.0.0.1" in m]
    assert progress and " MB of " in progress[0], messages  # a range read of the index: its size is known
    assert not list((tmp_path / "c").rglob("*.csv")) and not list((tmp_path / "c").rglob("*.partial*"))


def test_cancel_while_the_index_server_is_silent(mirror, tmp_path, monkeypatch):
    """Cancelling does not wait for the stall timeout (a QGIS task's Cancel must answer at once)."""
    import threading
    import time

    from range_server import Fault

    monkeypatch.setenv("ALPHAEARTH_HEIGHT_STALL_TIMEOUT", "60")
    root, cogs = mirror
    w = cogs["w"]
    aoi = AreaOfInterest(w.left + 1000, w.bottom + 1000, w.left + 1500, w.bottom + 1500, "EPSG:32630")
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with RangeServer(root, [Fault("aef_index.csv", "silent")]) as srv:
        started = time.monotonic()
        with pytest.raises(Cancelled):
            fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=f"{srv.url}/{PREFIX}",
                  cancel=stop.is_set)
        took = time.monotonic() - started
    assert took < 30, f"cancel waited {took:.0f} s (the stall timeout is 60 s)"
    assert [r[1] for r in srv.log.requests] == [f"/{PREFIX}/aef_index.csv"]  # cancelled in the first wait
    assert not (tmp_path / "e.tif").exists() and not list((tmp_path / "c").rglob("*.csv"))
