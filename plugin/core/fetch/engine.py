"""The tile loop shared by all sources: cache, parallel fetch, progress, cancel, output.

Phase 1 fills the cache (tiles fetched in parallel, each stored as soon as it
arrives, so an interrupted run resumes). Phase 2 assembles the cached tiles into the
output GeoTIFF, which appears under its name only once complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio

from .. import aef
from ..aoi import AreaOfInterest
from ..cancel import CancelFn, Cancelled, ProgressFn
from ..choices import FIRST_YEAR
from ..errors import InputError
from ..rasters import Grid, atomic_write
from .base import EmbeddingSource
from .cache import TileCache
from .tiling import Tile, plan_tiles


@dataclass
class FetchResult:
    path: Path
    grid: Grid
    source: str
    year: int
    tiles: int
    fetched: int       # tiles requested from the source in this run (damaged cached tiles included)
    from_cache: int    # tiles taken from the cache (intact ones only)
    valid_fraction: float
    seconds: float
    damaged: int = 0   # cached tiles that failed their check, were deleted and fetched again


def _check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise Cancelled()


def _fetch_missing(source: EmbeddingSource, cache: TileCache, missing: list[Tile], done: int, total: int,
                   progress: Optional[ProgressFn], cancel: Optional[CancelFn]) -> None:
    """Fetch tiles in parallel, storing each one on arrival; at most 2 x workers in flight."""
    def work(tile: Tile) -> None:
        values = source.read(tile.grid, cancel)
        cache.store(tile, aef.quantise(values))

    pending = iter(missing)
    with cf.ThreadPoolExecutor(max_workers=max(1, source.workers), thread_name_prefix="aef-fetch") as pool:
        running: set[cf.Future] = set()
        try:
            while True:
                while len(running) < 2 * max(1, source.workers):
                    tile = next(pending, None)
                    if tile is None:
                        break
                    _check_cancel(cancel)
                    running.add(pool.submit(work, tile))
                if not running:
                    return
                finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    done += 1
                    if progress is not None:
                        progress(done, total)
                _check_cancel(cancel)
        except BaseException:
            for future in running:
                future.cancel()
            raise


def run(source: EmbeddingSource, aoi: AreaOfInterest, grid: Grid, year: int, out_path: str | os.PathLike,
        cache: Optional[TileCache], progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None) -> FetchResult:
    """Fetch (or take from the cache) every tile of ``grid`` and write the output GeoTIFF.

    The source is prepared (log-in, index) only when some tile is missing, so a fully
    cached area is written again without network or credentials. A cached tile that
    fails its check when it is read (core.fetch.cache) is deleted and fetched again,
    preparing the source then if it was not yet.
    """
    start = time.monotonic()
    tiles = plan_tiles(grid, source.tile_size)
    total = len(tiles)
    missing = [t for t in tiles if not cache.has(t)] if cache is not None else tiles
    cached = total - len(missing)
    prepared = False

    def prepare() -> None:
        nonlocal prepared
        if not prepared:
            source.prepare(aoi, grid, year, cancel)
            prepared = True

    if progress is not None:
        progress(cached, total)
    if missing:
        prepare()
    if cache is not None:
        _fetch_missing(source, cache, missing, cached, total, progress, cancel)
    valid = damaged = 0

    def produce(tile: Tile) -> tuple[np.ndarray, bool]:
        """A tile's int8 values: from the cache, or (uncached source, damaged cached tile) read now.

        Runs in the reader thread: what GDAL signals while reading is not the output's error,
        and the next tile is read while this one is written.
        """
        values = cache.load(tile) if cache is not None else None
        if values is not None:
            return values, False
        if cache is not None:
            source.status(f"cached tile {cache.path(tile)} was damaged (it failed its checksum or could not be "
                          "read): deleted, fetching it again")
        prepare()
        values = aef.quantise(source.read(tile.grid, cancel))
        if cache is not None:
            cache.store(tile, values)
        return values, cache is not None

    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aef-tiles") as reader, \
            atomic_write(out_path) as tmp:
        with rasterio.open(tmp, "w", **aef.int8_profile(grid.width, grid.height, grid.crs, grid.transform)) as dst:
            pending = reader.submit(produce, tiles[0])
            for i, tile in enumerate(tiles, start=1):
                _check_cancel(cancel)
                values, refetched = pending.result()
                if i < total:
                    pending = reader.submit(produce, tiles[i])
                damaged += refetched
                if cache is None and progress is not None:
                    progress(i, total)
                dst.write(values, window=tile.window)
                valid += int(np.count_nonzero(values[0] != aef.NODATA_INT8))
            if valid == 0:
                raise InputError(f"area of interest ({year}, {source.name})", "has no embeddings at all",
                                 f"Check the year (AEF covers {FIRST_YEAR} onwards) and that the area is inside the "
                                 "data")
            aef.describe(dst, SOURCE=source.describe(), YEAR=str(year))
    return FetchResult(Path(out_path), grid, source.name, year, total, total - cached + damaged, cached - damaged,
                       valid / (grid.width * grid.height), time.monotonic() - start, damaged)
