"""An AEF mirror at the real one's scale, for the COG fetcher's budget tests and bench.

The tiles are laid out like the published ones (BigTIFF, 64 int8 bands stored band by
band, 1024² blocks, ZSTD, nodata -128, bottom-up), only smaller (``TILE`` px a side
instead of 8192) so the suite stays fast; the block math does not depend on the size.
Pixel values are noise of a chosen spread, so a block compresses to a chosen size
(``spread`` 6 gives about 0.6 MB per band per block, as published).

The index has the published columns (``WKT`` first, ``s3://`` paths), is sorted by UTM
zone then year, and is padded with rows of other zones and years (footprints with many
vertices, as the real ones have) to the real index's shape: over 100 k rows and 100 MB.
It is written with vectorised string joins, in a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as transform_points

from alphaearth_height.plugin.core import aef

from range_server import COLUMNS, PREFIX, S3

TILE = 2048
BLOCK = 1024
YEARS = tuple(range(2017, 2026))
POOL = 4  # distinct noise bands; band k is pool[k % POOL] shifted by k columns


def _pool(seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, spread, size=(POOL, TILE, TILE)) if spread > 0 else np.zeros((POOL, TILE, TILE))
    return np.clip(np.round(noise), -127, 127).astype(np.int8)


@dataclass
class BlockCog:
    """One tile of the mirror: where it is, its index row, its pixel values (north-up)."""

    path: Path
    rel: str
    crs: CRS
    left: float
    bottom: float
    pool: np.ndarray
    row: dict

    @property
    def top(self) -> float:
        return self.bottom + TILE * 10

    def truth(self, rows: slice, cols: slice) -> np.ndarray:
        """North-up int8 values (64, h, w) of a window of the tile."""
        r = np.arange(TILE)[rows]
        c = np.arange(TILE)[cols]
        out = np.empty((aef.N_BANDS, r.size, c.size), dtype=np.int8)
        for k in range(aef.N_BANDS):
            out[k] = self.pool[k % POOL][np.ix_(r, (c + k) % TILE)]
        return out

    def block_sizes(self) -> dict[tuple[int, int, int], int]:
        """Compressed bytes of each block: (band, block row, block col) -> size, block rows as stored."""
        sizes = {}
        with rasterio.open(self.path) as ds:
            n = TILE // BLOCK
            for band in range(1, ds.count + 1):
                for by in range(n):
                    for bx in range(n):
                        sizes[band, by, bx] = int(ds.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=band))
        return sizes


def write_tile(root: Path, year: int, epsg: int, left: float, bottom: float, seed: int, name: str,
               spread: float) -> BlockCog:
    """A published-layout tile under ``root``, and its index row."""
    crs = CRS.from_epsg(epsg)
    zone = f"{epsg - 32600}N"
    rel = f"{year}/{zone}/{name}-0000000000-0000000000.tiff"
    path = root / PREFIX / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    cog = BlockCog(path, rel, crs, left, bottom, _pool(seed, spread), {})
    profile = {"driver": "GTiff", "width": TILE, "height": TILE, "count": aef.N_BANDS, "dtype": "int8",
               "crs": crs, "transform": Affine(10, 0, left, 0, 10, bottom), "nodata": aef.NODATA_INT8,
               "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "interleave": "band",
               "compress": "zstd", "zstd_level": 1, "bigtiff": "YES", "num_threads": "2"}
    with rasterio.open(path, "w", **profile) as ds:
        for k in range(aef.N_BANDS):
            ds.write(_band(cog, k)[::-1], k + 1)  # stored bottom-up
            ds.set_band_description(k + 1, aef.BAND_NAMES[k])
    cog.row = _row(cog, year, zone)
    return cog


def _band(cog: BlockCog, k: int) -> np.ndarray:
    return np.roll(cog.pool[k % POOL], -k, axis=1)


def _row(cog: BlockCog, year: int, zone: str) -> dict:
    xs = [cog.left, cog.left + TILE * 10]
    ys = [cog.bottom, cog.top]
    lon, lat = transform_points(cog.crs, "EPSG:4326", [xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
    ring = ", ".join(f"{a} {b}" for a, b in zip(lon + lon[:1], lat + lat[:1]))
    return {"WKT": f"POLYGON (({ring}))", "crs": f"EPSG:{cog.crs.to_epsg()}", "year": str(year), "utm_zone": zone,
            "utm_west": repr(xs[0]), "utm_south": repr(ys[0]), "utm_east": repr(xs[1]), "utm_north": repr(ys[1]),
            "wgs84_west": repr(min(lon)), "wgs84_south": repr(min(lat)), "wgs84_east": repr(max(lon)),
            "wgs84_north": repr(max(lat)), "path": f"{S3}/{cog.rel}"}


def _zone_key(zone: str) -> tuple[int, str]:
    return int(zone[:-1]), zone[-1]


def _filler_wkts(count: int, vertices: int) -> list[str]:
    """Quoted footprint polygons with ``vertices`` points each (long, with commas inside)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        pts = rng.uniform(-1, 1, size=(vertices, 2)) + (i % 170, i % 80)
        ring = ", ".join(f"{x:.12f} {y:.12f}" for x, y in pts)
        out.append(f'"POLYGON (({ring}))"')
    return out


def write_index(path: Path, rows: list[dict], per_group: int = 105, vertices: int = 26) -> int:
    """The index CSV: ``rows`` plus filler tiles of every zone (1-60, N and S) and year, sorted by
    zone (number, then hemisphere) then year. Filler tiles lie near the equator-ward edge of their
    zone, far from the test areas, and are never read. Returns the number of rows."""
    groups: dict[tuple[int, str, int], list[str]] = {}
    wkts = _filler_wkts(64, vertices)
    for zone_no in range(1, 61):
        for hemi in ("N", "S"):
            epsg = (32600 if hemi == "N" else 32700) + zone_no
            for year in YEARS:
                i = np.arange(per_group)
                west = 200_000.0 + (i % 3) * 81_920.0
                south = 100_000.0 + (i // 3) * 81_920.0 if hemi == "N" else 9_000_000.0 - (i // 3) * 81_920.0
                lon0 = -180.0 + (zone_no - 1) * 6
                lat0 = (i // 3) * 0.7 if hemi == "N" else -(i // 3) * 0.7 - 0.7
                lines = [
                    f"{wkts[(j + zone_no) % len(wkts)]},EPSG:{epsg},{year},{zone_no}{hemi},{west[j]:.1f},"
                    f"{south[j]:.1f},{west[j] + 81_920.0:.1f},{south[j] + 81_920.0:.1f},{lon0 + (j % 3) * 1.4:.6f},"
                    f"{lat0[j]:.6f},{lon0 + (j % 3) * 1.4 + 1.6:.6f},{lat0[j] + 0.75:.6f},"
                    f"{S3}/{year}/{zone_no}{hemi}/filler{j:04d}-0000000000-0000000000.tiff"
                    for j in range(per_group)]
                groups[zone_no, hemi, year] = lines
    for row in rows:
        number, hemi = _zone_key(row["utm_zone"])
        text = ",".join(_csv_field(row[c]) for c in COLUMNS)
        groups.setdefault((number, hemi, int(row["year"])), []).append(text)
    ordered = [line for key in sorted(groups) for line in groups[key]]
    with open(path, "w", newline="") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        handle.write("\n".join(ordered) + "\n")
    return len(ordered)


def _csv_field(value: str) -> str:
    value = str(value)
    if any(ch in value for ch in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
