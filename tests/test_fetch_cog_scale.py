"""The "cog" source at the real mirror's scale, on 127.0.0.1 (tests/cog_mirror.py): a 120 MB,
113 k-row index sorted by zone then year, and tiles stored like the published ones (BigTIFF,
band by band, 1024² ZSTD blocks, ~0.6 MB per band per block). The server counts the bytes it
serves per path: the index budget (10 %), the block budget (1.5 x the blocks under the area),
the estimate (within 25 % of what was read), a re-run that reads nothing from the index."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as transform_points

from alphaearth_height import cli
from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.fetch import fetch
from alphaearth_height.plugin.core.fetch.cog_index import index_rows
from alphaearth_height.plugin.core.fetch.tiling import output_grid
from cog_mirror import BLOCK, TILE, BlockCog, write_index, write_tile
from range_server import PREFIX, RangeServer

INDEX = f"/{PREFIX}/aef_index.csv"


def snap(v: float, step: float = 10.0) -> float:
    return float(np.floor(v / step) * step)


@pytest.fixture(scope="module")
def big_mirror(tmp_path_factory):
    """Two tiles either side of the UTM 30/31 boundary at 0° (the zone-30 one overhangs by 1 km)
    and the big index listing them among 113 k others."""
    root = tmp_path_factory.mktemp("big_mirror")
    (x30,), (y30,) = transform_points("EPSG:4326", "EPSG:32630", [0.0], [45.01])
    (x31,), (y31,) = transform_points("EPSG:4326", "EPSG:32631", [0.0], [45.01])
    cogs = {"w": write_tile(root, 2020, 32630, snap(x30) + 1000 - TILE * 10, snap(y30) - 10_240, 11, "bw30", 6.0),
            "e": write_tile(root, 2020, 32631, snap(x31) - 1000, snap(y31) - 10_250, 12, "be31", 6.0)}
    index = root / PREFIX / "aef_index.csv"
    rows = write_index(index, [c.row for c in cogs.values()])
    assert rows >= 100_000 and index.stat().st_size >= 100e6
    return root, cogs, index.stat().st_size


def _blocks_under(cog: BlockCog, aoi: AreaOfInterest) -> set[tuple[int, int]]:
    """(block row as stored, block col) of the tile's blocks under the AOI's 10 m grid."""
    grid = output_grid(aoi)
    xs, ys = grid.bounds[0::2], grid.bounds[1::2]
    px, py = transform_points(grid.crs, cog.crs, [xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
    c0, c1 = max(0, math.floor((min(px) - cog.left) / 10)), min(TILE, math.ceil((max(px) - cog.left) / 10))
    s0, s1 = max(0, math.floor((min(py) - cog.bottom) / 10)), min(TILE, math.ceil((max(py) - cog.bottom) / 10))
    if c1 <= c0 or s1 <= s0:
        return set()
    return {(by, bx) for by in range(s0 // BLOCK, (s1 - 1) // BLOCK + 1) for bx in range(c0 // BLOCK, (c1 - 1) // BLOCK + 1)}


def _compressed(cog: BlockCog, blocks: set) -> int:
    sizes = cog.block_sizes()
    return sum(v for (band, by, bx), v in sizes.items() if (by, bx) in blocks)


def _truth_on(grid, cog: BlockCog) -> tuple[np.ndarray, np.ndarray]:
    """The tile's int8 values at the grid's pixel centres (nearest) and where it has them."""
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    px, py = (np.asarray(v) for v in transform_points(grid.crs, cog.crs, xs, ys))
    c = np.floor((px - cog.left) / 10).astype(int)
    r = np.floor((cog.top - py) / 10).astype(int)
    inside = (c >= 0) & (c < TILE) & (r >= 0) & (r < TILE)
    values = np.full((aef.N_BANDS, c.size), aef.NODATA_INT8, dtype=np.int8)
    for k in range(aef.N_BANDS):
        values[k, inside] = cog.pool[k % 4][r[inside], (c[inside] + k) % TILE]
    return values.reshape(aef.N_BANDS, grid.height, grid.width), inside.reshape(grid.height, grid.width)


def _printed_estimate(capsys, aoi: AreaOfInterest, base: str, cache) -> float:
    """The bytes ``fetch --estimate-only`` prints (MiB to download)."""
    code = cli.main(["fetch", "--source", "cog", "--aoi", *map(str, aoi.bounds), "--aoi-crs", aoi.crs,
                     "--year", "2020", "--base-url", base, "--cache-dir", str(cache), "--estimate-only"])
    out = capsys.readouterr().out
    assert code == 0, out
    return float(re.search(r"~([\d,.]+) MiB to download", out).group(1).replace(",", "")) * 2**20


def _tile_bytes(srv: RangeServer) -> int:
    return sum(n for path, n in srv.log.bytes_served.items() if path.endswith(".tiff"))


def test_small_aoi_reads_a_sliver_of_the_index_and_each_block_once(big_mirror, tmp_path, capsys):
    root, cogs, index_size = big_mirror
    w = cogs["w"]
    # 1 km² whose 512-px output tiles share blocks: 4 output tiles, one block position
    aoi = AreaOfInterest(w.left + 4_800, w.bottom + 4_600, w.left + 5_800, w.bottom + 5_600, "EPSG:32630")
    blocks = _blocks_under(w, aoi)
    assert len(blocks) == 1
    with RangeServer(root) as srv:
        base = f"{srv.url}/{PREFIX}"
        printed = _printed_estimate(capsys, aoi, base, tmp_path / "c")
        estimate_index = srv.log.bytes_served.get(INDEX, 0)
        result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base, tile_size=64)
        read = _tile_bytes(srv)
        assert srv.log.bytes_served.get(INDEX, 0) == estimate_index  # the fetch reused the estimate's slice
        # another area of the same zone and year: nothing more from the index
        aoi2 = AreaOfInterest(w.left + 12_000, w.bottom + 12_000, w.left + 14_000, w.bottom + 17_000, "EPSG:32630")
        fetch(aoi2, 2020, "cog", tmp_path / "e2.tif", cache_dir=tmp_path / "c", base_url=base)
        assert srv.log.bytes_served.get(INDEX, 0) == estimate_index
    assert 0 < estimate_index <= 0.10 * index_size
    compressed = _compressed(w, blocks)
    assert compressed <= read <= 1.5 * compressed, (read, compressed)  # 16 output tiles, each block once
    assert abs(printed - read) <= 0.25 * read, (printed, read)
    grid = output_grid(aoi)
    truth, inside = _truth_on(grid, w)
    assert inside.all()
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), truth)


def test_aoi_across_two_zones_by_blocks(big_mirror, tmp_path, capsys):
    root, cogs, index_size = big_mirror
    aoi = AreaOfInterest(-0.03, 45.0, 0.03, 45.004, "EPSG:4326")  # ~2 km², 2.4 km into each zone
    with RangeServer(root) as srv:
        base = f"{srv.url}/{PREFIX}"
        printed = _printed_estimate(capsys, aoi, base, tmp_path / "c")
        result = fetch(aoi, 2020, "cog", tmp_path / "e.tif", cache_dir=tmp_path / "c", base_url=base, workers=4)
        read = _tile_bytes(srv)
        index_read = srv.log.bytes_served.get(INDEX, 0)
        touched = {p for p in srv.log.bytes_served if p.endswith(".tiff")}
    assert touched == {f"/{PREFIX}/{c.rel}" for c in cogs.values()}
    assert 0 < index_read <= 0.10 * index_size
    compressed = sum(_compressed(c, _blocks_under(c, aoi)) for c in cogs.values())
    assert read <= 1.5 * compressed, (read, compressed)
    assert abs(printed - read) <= 0.25 * read, (printed, read)
    assert result.valid_fraction == 1.0
    grid = output_grid(aoi)
    own, other = (cogs["w"], cogs["e"]) if grid.crs.to_epsg() == 32630 else (cogs["e"], cogs["w"])
    first, in_first = _truth_on(grid, own)
    second, _ = _truth_on(grid, other)
    expected = np.where(in_first[None], first, second)  # the grid's own zone first
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), expected)


def _small_index(folder, shuffle: bool) -> None:
    """A 2 MB index with the published columns (zones 1-60 x N/S x years, 2 rows each)."""
    index = folder / PREFIX / "aef_index.csv"
    index.parent.mkdir(parents=True, exist_ok=True)
    write_index(index, [], per_group=2)
    if shuffle:
        lines = index.read_text().splitlines()
        body = lines[1:]
        np.random.default_rng(3).shuffle(body)
        index.write_text("\n".join([lines[0], *body]) + "\n")


@pytest.mark.parametrize("trouble", ["unsorted", "no ranges"])
def test_index_whole_download_when_not_laid_out_as_expected(tmp_path, trouble):
    """Unsorted rows, or a server ignoring Range: the index is downloaded whole (resuming a
    dropped transfer where it stopped), and the status line says why."""
    from range_server import Fault

    _small_index(tmp_path, shuffle=trouble == "unsorted")
    grid = output_grid(AreaOfInterest(-75.5, 1.0, -75.4, 1.1, "EPSG:4326"))
    messages = []
    faults = [Fault("aef_index.csv", "cut", times=1, ranged=False)] if trouble == "unsorted" else []
    with RangeServer(tmp_path, faults) as srv:
        if trouble == "no ranges":
            srv.no_ranges = ("aef_index.csv",)
        rows, stats = index_rows(f"{srv.url}/{PREFIX}", tmp_path / "c", grid, 2020, retry_delay=0.05,
                                 status=messages.append)
        rows = list(rows)
    assert stats.whole and any("not laid out as expected" in m for m in messages), messages
    size = (tmp_path / PREFIX / "aef_index.csv").stat().st_size
    assert len(rows) == 60 * 2 * 9 * 2
    gets = [r for r in srv.log.requests if r[0] == "GET"]
    if trouble == "unsorted":  # sampled, found unsorted, downloaded whole; cut once and resumed
        resumed = [r for r in gets if r[2] and not r[2].startswith("bytes=0-")]
        assert any(r[2].endswith("-") for r in resumed), gets
        assert any("resuming at" in m for m in messages), messages
        whole = [r for r in gets if r[2] is None or r[2].endswith("-")]
        assert sum(srv.log.bytes_served.values()) < 1.5 * size + 2**20 and len(whole) == 2
    else:
        assert len(gets) == 2  # the first range read (answered whole: 200), then the download


def test_index_slice_of_a_zone_and_year_is_complete(big_mirror, tmp_path):
    """The bisection finds every row of the zones around an area (checked against a full parse)."""
    import csv

    root, cogs, index_size = big_mirror
    grid = output_grid(AreaOfInterest(-0.5, 20.0, -0.4, 20.1, "EPSG:4326"))  # zone 30, within reach of 31
    with RangeServer(root) as srv:
        rows, stats = index_rows(f"{srv.url}/{PREFIX}", tmp_path / "c", grid, 2019)
        rows = list(rows)
    expected = []
    with open(root / PREFIX / "aef_index.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["year"] == "2019" and row["utm_zone"] in ("30N", "31N"):
                expected.append(row["path"])
    assert sorted(r["path"] for r in rows) == sorted(expected) and len(expected) >= 200
    assert not stats.whole and stats.bytes_read <= 0.10 * index_size


def test_google_bucket_index_without_paths_is_refused_in_one_line(tmp_path):
    """Google's bucket publishes the same tiles with an index that has no ``path`` column."""
    from alphaearth_height.plugin.core.errors import InputError
    from range_server import COLUMNS

    index = tmp_path / PREFIX / "aef_index.csv"
    index.parent.mkdir(parents=True)
    columns = [c for c in COLUMNS if c != "path"]
    index.write_text(",".join(columns) + "\n" + ",".join(["x"] * len(columns)) + "\n")
    grid = output_grid(AreaOfInterest(-0.5, 45.0, -0.4, 45.1, "EPSG:4326"))
    with RangeServer(tmp_path) as srv, pytest.raises(InputError) as err:
        index_rows(f"{srv.url}/{PREFIX}", tmp_path / "c", grid, 2020)
    assert "no path column" in err.value.problem and "Source Cooperative" in err.value.fix
