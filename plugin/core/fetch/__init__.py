"""Embedding fetchers behind one interface: Earth Engine, the public AEF COGs, local rasters.

``fetch`` writes an AEF int8 embeddings GeoTIFF (64 bands A00..A63, nodata -128,
source/year/attribution tags) on one north-up grid: the AOI's UTM zone at 10 m, or the
caller's grid. ``estimate`` says what that costs before anything is fetched. Remote
tiles are cached on disk, so repeated and interrupted fetches do not fetch twice.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Optional

from ..aoi import AreaOfInterest
from ..errors import InputError
from ..inference import CancelFn, ProgressFn
from ..rasters import Grid, check_output_path, grow_grid
from . import engine
from .base import EmbeddingSource
from .cache import TileCache, cache_size, clear_cache, default_cache_dir, resolve_cache_dir
from .engine import FetchResult
from .tiling import plan_tiles

SOURCES = ("earthengine", "cog", "local")
FIRST_YEAR = 2017

__all__ = ["SOURCES", "FetchResult", "fetch", "context_grids", "estimate", "format_estimate", "make_source",
           "cache_size", "clear_cache", "default_cache_dir"]


def check_year(year: Any) -> int:
    try:
        value = int(year)
    except (TypeError, ValueError):
        raise InputError(f"year {year!r}", "is not a year", "Give a year such as 2020") from None
    last = datetime.date.today().year
    if not FIRST_YEAR <= value <= last:
        raise InputError(f"year {value}", f"is outside the AlphaEarth years ({FIRST_YEAR}-{last})",
                         "Give a year from 2017 on")
    return value


def make_source(source: str, cache_root: Optional[os.PathLike] = None, **options: Any) -> EmbeddingSource:
    """Build a source by name; unknown names and options are input errors."""
    from .cog import CogSource
    from .earthengine import EarthEngineSource
    from .local import LocalSource

    classes = {"earthengine": EarthEngineSource, "cog": CogSource, "local": LocalSource}
    if source not in classes:
        raise InputError(f"source {source!r}", "is unknown", f"Use one of {', '.join(SOURCES)}")
    if source == "cog":
        options["cache_root"] = cache_root
    try:
        return classes[source](**options)
    except TypeError as exc:
        raise InputError(f"source {source!r}", f"got an option it does not take ({exc})",
                         "Check the option names") from None


def fetch(aoi: AreaOfInterest, year: int, source: str, out_path: str | os.PathLike, *,
          grid: Optional[Grid] = None, cache_dir: Optional[str | os.PathLike] = None,
          progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
          **source_options: Any) -> FetchResult:
    """Fetch the AOI's embeddings for ``year`` from ``source`` into ``out_path``.

    progress(done, total) counts tiles; cancel() returning True stops the fetch with
    core.inference.Cancelled, leaving no output but keeping finished tiles cached.
    """
    year = check_year(year)
    cache_root = resolve_cache_dir(cache_dir)
    src = make_source(source, cache_root, **source_options)
    try:
        check_output_path(out_path, *src.inputs())
        out_grid = src.grid_for(aoi, grid)
        cache = (TileCache(cache_root, src.name, year, out_grid.crs, out_grid.resolution)
                 if src.cacheable else None)
        return engine.run(src, aoi, out_grid, year, out_path, cache, progress, cancel)
    finally:
        src.close()


def context_grids(aoi: AreaOfInterest, source: str, context: int,
                  **source_options: Any) -> tuple[Grid, Grid]:
    """The grid ``fetch`` gives the AOI, and that grid grown by ``context`` px on every side.

    The grown grid is clipped at the data's own edge where the source knows it (a local
    raster's extent); remote sources simply cover the larger area.
    """
    src = make_source(source, None, **source_options)
    try:
        inner = src.grid_for(aoi, None)
        return inner, grow_grid(inner, context, src.extent())
    finally:
        src.close()


def estimate(aoi: AreaOfInterest, year: int, source: str, *, grid: Optional[Grid] = None,
             cache_dir: Optional[str | os.PathLike] = None, **source_options: Any) -> dict:
    """Pixels, bytes, tiles and requests a fetch would take, and what the cache already holds."""
    year = check_year(year)
    cache_root = resolve_cache_dir(cache_dir)
    src = make_source(source, cache_root, **source_options)
    try:
        out_grid = src.grid_for(aoi, grid)
        tiles = plan_tiles(out_grid, src.tile_size)
        cache = TileCache(cache_root, src.name, year, out_grid.crs, out_grid.resolution) if src.cacheable else None
        cached = sum(1 for t in tiles if cache.has(t)) if cache is not None else 0
        res_x, res_y = out_grid.resolution
        pixels = out_grid.width * out_grid.height
        info = {"source": src.name, "year": year, "crs": out_grid.crs.to_string(), "width": out_grid.width,
                "height": out_grid.height, "pixels": pixels, "area_km2": pixels * res_x * res_y / 1e6,
                "tiles": len(tiles), "tiles_cached": cached, "output_bytes": pixels * 64}
        info.update(src.estimate(aoi, out_grid, year, len(tiles)))
        if cached and "requests" in info:  # only missing tiles are requested
            share = 1 - cached / len(tiles)
            info["requests"] = len(tiles) - cached
            info["download_bytes"] = math.ceil(info["download_bytes"] * share)
        return info
    finally:
        src.close()


def format_estimate(info: dict) -> str:
    """One line for the CLI and the dock."""
    mib = info.get("download_bytes", 0) / 2**20
    text = (f"{info['source']} {info['year']}: {info['width']}x{info['height']} px ({info['pixels']:,} px, "
            f"{info['area_km2']:.1f} km²) in {info['crs']}, {info['tiles']} tiles "
            f"({info['tiles_cached']} cached), ~{mib:,.1f} MiB to download, "
            f"{info['output_bytes'] / 2**20:,.1f} MiB output")
    if info.get("requests"):
        text += f", {info['requests']} requests"
    if info.get("files") is not None:
        text += f", {info['files']} COG file(s)"
    return text
