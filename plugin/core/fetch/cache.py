"""On-disk cache of fetched tiles, so a repeated or interrupted fetch costs nothing twice.

Layout: ``<cache>/<source>/<year>/<crs>/<res>m/<x0>_<y0>_<w>x<h>.tif`` (AEF int8). Each
tile is written under a temporary name and renamed into place, so a tile file that
exists is always complete: a fetch killed half-way resumes from the tiles it finished.

Each tile carries the SHA-256 of its pixel values (tag ``AEH_SHA256``), checked on every
read: a tile that does not open, has the wrong shape, or whose pixels do not match
their checksum (disk damage, a file overwritten by hand, a tile from an older version
without one) is deleted and fetched again, never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio
from rasterio.crs import CRS

from .. import aef
from ..rasters import remove_stale_partials_once, replace_when_done
from .tiling import Tile

CACHE_ENV = "ALPHAEARTH_HEIGHT_CACHE"
CHECKSUM_TAG = "AEH_SHA256"
CACHED_SOURCES = ("earthengine", "cog", "copernicus")  # the only folders clear_cache() deletes


def default_cache_dir() -> Path:
    """$ALPHAEARTH_HEIGHT_CACHE, else ~/.cache/alphaearth_height."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "alphaearth_height"


def resolve_cache_dir(cache_dir: Optional[str | os.PathLike]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def crs_slug(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG_{epsg}" if epsg else "crs_" + hashlib.sha1(crs.to_wkt().encode()).hexdigest()[:12]


def _number(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def checksum(values: np.ndarray) -> str:
    """SHA-256 of int8 tile values (band, row, column order)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int8).tobytes()).hexdigest()


class TileCache:
    """Tiles of one source, year and grid CRS/resolution."""

    def __init__(self, root: Path, source: str, year: int, crs: CRS, resolution: tuple[float, float]) -> None:
        res = _number(resolution[0]) if resolution[0] == resolution[1] else "x".join(map(_number, resolution))
        self.folder = root / source / str(year) / crs_slug(crs) / f"{res}m"
        self.discarded = 0  # damaged tiles found (and deleted) by load()

    def path(self, tile: Tile) -> Path:
        t = tile.grid.transform
        return self.folder / f"{_number(t.c)}_{_number(t.f)}_{tile.grid.width}x{tile.grid.height}.tif"

    def has(self, tile: Tile) -> bool:
        return self.path(tile).is_file()

    def load(self, tile: Tile) -> Optional[np.ndarray]:
        """The tile's int8 values, or None when absent or not intact (then it is deleted)."""
        path = self.path(tile)
        if not path.is_file():
            return None
        try:
            with rasterio.open(path) as src:
                values = src.read()
                recorded = src.tags().get(CHECKSUM_TAG)
        except Exception:  # noqa: BLE001 - whatever GDAL makes of a damaged file, it is not a tile
            recorded, values = None, None
        intact = (values is not None and recorded is not None and values.dtype == np.int8
                  and values.shape == (aef.N_BANDS, tile.grid.height, tile.grid.width)
                  and checksum(values) == recorded)
        if not intact:
            self.discarded += 1
            path.unlink(missing_ok=True)
            return None
        return values

    def store(self, tile: Tile, values: np.ndarray) -> None:
        """Write int8 values atomically (temporary file in the same folder, then rename)."""
        path = self.path(tile)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials_once(path.parent)  # tiles of runs killed outright (SIGKILL, power cut)
        profile = aef.int8_profile(tile.grid.width, tile.grid.height, tile.grid.crs, tile.grid.transform)
        with replace_when_done(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(values)
            dst.update_tags(**{CHECKSUM_TAG: checksum(values)})


def cache_size(cache_dir: Optional[str | os.PathLike] = None) -> int:
    """Bytes used by cached tiles and indexes."""
    root = resolve_cache_dir(cache_dir)
    return sum(p.stat().st_size for name in CACHED_SOURCES for p in (root / name).rglob("*") if p.is_file())


def clear_cache(cache_dir: Optional[str | os.PathLike] = None) -> int:
    """Delete the cached tiles and indexes; returns the bytes freed.

    Only our own source folders are removed, never the whole folder, in case a user
    pointed the cache at a folder that holds other files too.
    """
    freed = cache_size(cache_dir)
    root = resolve_cache_dir(cache_dir)
    for name in CACHED_SOURCES:
        shutil.rmtree(root / name, ignore_errors=True)
    return freed
