"""Network faults against servers on 127.0.0.1 (silence, trickles, wrong answers), the tile
cache, the size guard and bad areas: everything ``fetch`` meets before and while it downloads.

Each server is tests/range_server.py's, serving a small AEF mirror, started in ``args(ws)``
with a bounded lifetime and stopped by the runner when the case ends. The CLI child gets
short network limits through the environment (the documented variables), so "ends within
its deadline" is checked against the same numbers the code promises.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import rasterio

from range_server import PREFIX, Fault, RangeServer, build_mirror

from . import Case

STALL, INDEX_DEADLINE, TILE_DEADLINE = 2.0, 8.0, 8.0
STARTUP = 15.0  # the CLI's own start (imports, estimate) and exit, on a busy 2-core machine
LIMITS = {"ALPHAEARTH_HEIGHT_STALL_TIMEOUT": str(STALL), "ALPHAEARTH_HEIGHT_INDEX_DEADLINE": str(INDEX_DEADLINE),
          "ALPHAEARTH_HEIGHT_TILE_DEADLINE": str(TILE_DEADLINE)}
_MIRROR: dict = {}


def mirror() -> tuple[Path, dict]:
    """The AEF mirror (COGs + index), built once per test run."""
    if not _MIRROR:
        root = Path(tempfile.mkdtemp(prefix="aeh-mirror-"))
        atexit.register(shutil.rmtree, root, True)
        _MIRROR.update(root=root, cogs=build_mirror(root))
    return _MIRROR["root"], _MIRROR["cogs"]


def serve(ws, *faults: Fault, lifetime: float = 120.0) -> str:
    """Start a mirror server with ``faults`` for this case; its base URL (also in ws.values)."""
    root, _ = mirror()
    server = ws.start(RangeServer(root, faults, lifetime=lifetime))
    ws.values["server"] = server
    ws.values["base"] = f"{server.url}/{PREFIX}"
    return ws.values["base"]


def aoi_args(ws) -> list:
    """~1 km² inside the west COG (UTM 30N), 2020."""
    w = mirror()[1]["w"]
    return ["--aoi", w.left + 1000, w.bottom + 1000, w.left + 2000, w.bottom + 2000, "--aoi-crs", "EPSG:32630",
            "--year", "2020"]


def cog_fetch(ws, *faults: Fault, cache: Path | None = None) -> list:
    base = serve(ws, *faults)
    return ["fetch", "--source", "cog", "--base-url", base, *aoi_args(ws), "--out", ws.out / "e.tif",
            "--cache-dir", cache or ws.out / "cache"]


def processing_fetch(ws) -> tuple[str, dict]:
    """The same fetch through Processing (the server ws.values names)."""
    w = mirror()[1]["w"]
    extent = f"{w.left + 1000},{w.left + 2000},{w.bottom + 1000},{w.bottom + 2000} [EPSG:32630]"
    return ("fetchembeddings", {"SOURCE": 1, "EXTENT": extent, "YEAR": 2020, "BASE_URL": ws.values["base"],
                                "CACHE_DIR": str(ws.out / "cache"), "OUTPUT": str(ws.out / "e.tif")})


def waits_are_shown(ws, stdout: str, stderr: str) -> None:
    """The user saw what was waited for before the error: the first line names the index and the host."""
    first = stderr.splitlines()[0]
    assert "tile index" in first and "waiting for 127.0.0.1" in first, stderr


def nothing_cached_as_index(ws, stdout: str, stderr: str) -> None:
    assert not list((ws.out / "cache").rglob("*.csv")), "a bad answer was cached as the index"


# ---- the tile index server misbehaves ------------------------------------------------------------


def _silent_index(ws):
    return cog_fetch(ws, Fault("aef_index.csv", "silent"))


def _trickling_index(ws):
    return cog_fetch(ws, Fault("aef_index.csv", "trickle", interval=0.4))


def _html_index(ws):
    return cog_fetch(ws, Fault("aef_index.csv", "html"))


def _refused_index(ws):
    return cog_fetch(ws, Fault("aef_index.csv", "status", status=403))


def _busy_then_fine(ws):
    """503 twice for the index and twice for the tile file, then normal service: the fetch succeeds."""
    return cog_fetch(ws, Fault("aef_index.csv", "status", status=503, times=2),
                     Fault(".tiff", "status", status=503, times=2))


def _rode_out_503s(ws, stdout: str, stderr: str) -> None:
    server = ws.values["server"]
    assert all(f.hits == f.times for f in server.faults), [(f.suffix, f.hits) for f in server.faults]
    assert "HTTP 503" in stderr and "trying again" in stderr, stderr
    with rasterio.open(ws.out / "e.tif") as ds:
        assert ds.count == 64 and (ds.read(1) != -128).all()


def _stale_html_in_cache(ws):
    """An HTML page an older version stored as the cached index: found, deleted, downloaded again."""
    from alphaearth_height.plugin.core.fetch.cog_index import index_path

    args = cog_fetch(ws, cache=ws.root / "cache")  # outside ws.out: the runner keeps files there unchanged
    target = index_path(ws.values["base"], ws.root / "cache")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n")
    return args


def _index_replaced(ws, stdout: str, stderr: str) -> None:
    assert "deleted, reading it again" in stderr, stderr
    indexes = list((ws.root / "cache").rglob("*aef_index.csv"))
    assert len(indexes) == 1 and indexes[0].read_text().startswith("WKT,"), indexes


# ---- the tile server misbehaves (index fine) -------------------------------------------------------


def _silent_tiles(ws):
    return cog_fetch(ws, Fault(".tiff", "silent"))


def _refused_tiles(ws):
    return cog_fetch(ws, Fault(".tiff", "status", status=403))


# ---- a damaged tile in the cache -------------------------------------------------------------------


def _damaged_cache(ws):
    """A first fetch fills the cache (outside ws.out); then one tile is overwritten with garbage."""
    from alphaearth_height.plugin.core.aoi import AreaOfInterest
    from alphaearth_height.plugin.core.fetch import fetch

    args = cog_fetch(ws, cache=ws.root / "cache")
    w = mirror()[1]["w"]
    aoi = AreaOfInterest(w.left + 1000, w.bottom + 1000, w.left + 2000, w.bottom + 2000, "EPSG:32630")
    fetch(aoi, 2020, "cog", ws.inputs / "reference.tif", cache_dir=ws.root / "cache", base_url=ws.values["base"])
    tiles = sorted((ws.root / "cache" / "cog").rglob("*x*.tif"))
    assert tiles, "the first fetch cached no tile"
    tiles[0].write_bytes(b"garbage\n" * 100)
    ws.values["damaged"] = tiles[0]
    return args


def _damaged_tile_fetched_again(ws, stdout: str, stderr: str) -> None:
    assert "damaged cached tile(s) fetched again" in stdout and "1 fetched" in stdout, stdout
    assert "was damaged" in stderr, stderr
    with rasterio.open(ws.out / "e.tif") as got, rasterio.open(ws.inputs / "reference.tif") as want:
        assert (got.read() == want.read()).all() and (got.read(1) != -128).all()
    with rasterio.open(ws.values["damaged"]) as tile:  # stored again, intact
        assert tile.count == 64 and "AEH_SHA256" in tile.tags()


# ---- size guard --------------------------------------------------------------------------------------

FRANCE = ["--aoi", "-5", "42", "8", "51", "--year", "2020"]


def _france(ws):
    return ["fetch", "--source", "earthengine", *FRANCE, "--out", ws.out / "e.tif"]


def _france_processing(ws):
    return ("fetchembeddings", {"SOURCE": 2, "EXTENT": "-5,8,42,51 [EPSG:4326]", "YEAR": 2020,
                                "OUTPUT": str(ws.out / "e.tif")})


def _local_scene(ws, *extra):
    g = ws.scene.grid
    left, top = g.transform.c, g.transform.f
    return ["fetch", "--source", "local", "--local-raster", ws.scene.embeddings, "--aoi", left + 100,
            top - 2000, left + 2000, top - 100, "--aoi-crs", g.crs.to_string(), "--year", "2020",
            "--out", ws.out / "e.tif", *extra]


TINY_LIMIT = {"ALPHAEARTH_HEIGHT_MAX_GB": "0.0001"}  # 100 kB: the 190 x 190 px scene clip (2.3 MB) is "huge"


def _wrote_embeddings(ws, stdout: str, stderr: str) -> None:
    assert "wrote" in stdout, stdout
    with rasterio.open(ws.out / "e.tif") as ds:
        assert ds.count == 64 and ds.width == 190


def _huge_local(ws):
    """A 200,000 x 200,000 px embeddings raster (sparse: 2 MB on disk); fetching it all would write
    2.6 TB (a floor of 640 GB compressed), more than any test disk has free."""
    from affine import Affine

    path = ws.inputs / "huge.tif"
    profile = {"driver": "GTiff", "width": 200_000, "height": 200_000, "count": 64, "dtype": "int8",
               "nodata": -128, "crs": "EPSG:32630", "transform": Affine(10, 0, 500_000, 0, -10, 5_000_000),
               "tiled": True, "blockxsize": 512, "blockysize": 512, "sparse_ok": True, "BIGTIFF": "YES",
               "compress": "deflate"}
    with rasterio.open(path, "w", **profile):
        pass
    if shutil.disk_usage(ws.out).free > 640e9:
        import pytest

        pytest.skip("this disk has 640 GB free: the fetch would not be refused")
    return ["fetch", "--source", "local", "--local-raster", path, "--aoi", "500000", "3000000", "2500000",
            "5000000", "--aoi-crs", "EPSG:32630", "--year", "2020", "--out", ws.out / "e.tif", "--yes"]


def _huge_local_processing(ws):
    return ("fetchembeddings", {"SOURCE": 0, "INPUT": str(ws.inputs / "huge.tif"), "MAX_GB": 0,
                                "EXTENT": "500000,2500000,3000000,5000000 [EPSG:32630]", "OUTPUT": str(ws.out / "e.tif")})


# ---- bad areas and settings ---------------------------------------------------------------------------


def _latitude_95(ws):
    return ["fetch", "--source", "earthengine", "--aoi", "-5", "42", "8", "95", "--year", "2020",
            "--out", ws.out / "e.tif"]


def _unknown_crs(ws):
    return ["fetch", "--source", "cog", *FRANCE, "--aoi-crs", "EPSG:999999", "--out", ws.out / "e.tif"]


def _bad_stall_setting(ws):
    return cog_fetch(ws)


CASES = [
    Case("fetch cog: index server accepts and never answers", _silent_index,
         ("aef_index.csv", "did not answer", "within 2 s"), may_write=("cache*",), env=LIMITS,
         deadline_s=INDEX_DEADLINE + STARTUP, timeout_s=120, check=waits_are_shown,
         processing=processing_fetch),
    Case("fetch cog: index server trickles a byte at a time", _trickling_index,
         ("aef_index.csv", "stalled", "less than 1 KB"), may_write=("cache*",), env=LIMITS,
         deadline_s=INDEX_DEADLINE + STARTUP, timeout_s=120, check=waits_are_shown),
    Case("fetch cog: index answered by an HTML page with status 200", _html_index,
         ("aef_index.csv", "HTML page", "captive portal"), may_write=("cache*",), env=LIMITS,
         deadline_s=STARTUP, check=nothing_cached_as_index, processing=processing_fetch),
    Case("fetch cog: server refuses the index (403)", _refused_index, ("aef_index.csv", "refused", "HTTP 403"),
         may_write=("cache*",), env=LIMITS, deadline_s=STARTUP, processing=processing_fetch),
    Case("fetch cog: 503 twice for index and tiles, then success", _busy_then_fine, exit_code=0,
         may_write=("cache*", "e.tif"), env=LIMITS, deadline_s=INDEX_DEADLINE + TILE_DEADLINE + STARTUP,
         check=_rode_out_503s),
    Case("fetch cog: cached index is an old HTML page", _stale_html_in_cache, exit_code=0,
         may_write=("cache*", "e.tif"), env=LIMITS, check=_index_replaced),
    Case("fetch cog: tile server accepts and never answers", _silent_tiles,
         ("xw30-0000000000-0000000000.tiff", "could not be read", "stalled"), may_write=("cache*",), env=LIMITS,
         deadline_s=TILE_DEADLINE + STARTUP, timeout_s=120),
    Case("fetch cog: server refuses the tiles (403)", _refused_tiles, (".tiff", "refused", "HTTP 403"),
         may_write=("cache*",), env=LIMITS, deadline_s=STARTUP),
    Case("fetch cog: corrupted cached tile is fetched again", _damaged_cache, exit_code=0, may_write=("e.tif",),
         env=LIMITS, check=_damaged_tile_fetched_again),
    Case("fetch: France from Earth Engine without --yes", _france,
         ("2.8 TB", "76,140 requests", "over the 5 GB limit", "to go ahead"), processing=_france_processing),
    Case("fetch: over a lowered limit without --yes", lambda ws: _local_scene(ws),
         ("write ~2.3 MB", "over the 0.0001 GB limit", "--yes"), env=TINY_LIMIT),
    Case("fetch: over a lowered limit with --yes", lambda ws: _local_scene(ws, "--yes"), exit_code=0,
         may_write=("e.tif",), env=TINY_LIMIT, check=_wrote_embeddings),
    Case("fetch: over a lowered limit with --max-gb 1", lambda ws: _local_scene(ws, "--max-gb", "1"), exit_code=0,
         may_write=("e.tif",), env=TINY_LIMIT, check=_wrote_embeddings),
    Case("fetch: local 2.6 TB write with --yes, on a disk without room", _huge_local,
         lambda ws: [str(ws.out / "e.tif"), "cannot be written", "200000 x 200000 px embeddings", "free there"],
         deadline_s=STARTUP, processing=_huge_local_processing),
    Case("fetch: --max-gb not positive", lambda ws: _local_scene(ws, "--max-gb", "-1"),
         ("size limit -1.0 GB", "not a positive number")),
    Case("fetch: ALPHAEARTH_HEIGHT_MAX_GB not a number", lambda ws: _local_scene(ws),
         ("ALPHAEARTH_HEIGHT_MAX_GB=lots", "not a positive number of gigabytes"), env={"ALPHAEARTH_HEIGHT_MAX_GB": "lots"}),
    Case("fetch: latitude 95", _latitude_95, ("latitude 95", "-90..90", "--aoi-crs")),
    Case("fetch: --aoi-crs EPSG:999999", _unknown_crs, ("EPSG:999999", "not a coordinate reference system")),
    Case("fetch: stall timeout setting not a number", _bad_stall_setting,
         ("ALPHAEARTH_HEIGHT_STALL_TIMEOUT=soon", "not a positive number of seconds"),
         env={"ALPHAEARTH_HEIGHT_STALL_TIMEOUT": "soon"}),
]
