"""Embedding fetchers behind one interface: Earth Engine, the public AEF COGs, local rasters.

``fetch`` writes an AEF int8 embeddings GeoTIFF (64 bands A00..A63, nodata -128,
source/year/attribution tags) on one north-up grid: the AOI's UTM zone at 10 m, or the
caller's grid. ``estimate`` says what that costs before anything is fetched. Remote
tiles are cached on disk, so repeated and interrupted fetches do not fetch twice.

Guards: ``fetch`` refuses to start when the output (and the tiles it caches) cannot fit
on the disk; the front ends refuse, or ask, before a fetch larger than the size limit
(``check_size``: $ALPHAEARTH_HEIGHT_MAX_GB, default 5 GB downloaded or written).
Network operations have deadlines and stall timeouts (core.fetch.network).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from ..aoi import AreaOfInterest
from ..cancel import CancelFn, ProgressFn
from ..choices import FIRST_YEAR, SOURCES, check_choice, last_year
from ..errors import InputError
from ..rasters import Grid, check_output_path, ensure_free_space, grow_grid, raster_bytes
from ..sizes import positive_from_env
from . import engine
from .base import EmbeddingSource
from .cache import TileCache, cache_size, clear_cache, default_cache_dir, resolve_cache_dir
from .engine import FetchResult
from .network import StatusFn
from .tiling import output_grid, plan_tiles

MAX_GB_ENV = "ALPHAEARTH_HEIGHT_MAX_GB"
DEFAULT_MAX_GB = 5.0

__all__ = ["SOURCES", "FetchResult", "fetch", "context_grids", "estimate", "format_estimate", "make_source",
           "output_grid", "source_options",
           "cache_size", "clear_cache", "default_cache_dir", "check_size", "size_limit_gb", "DEFAULT_MAX_GB"]


def check_year(year: Any) -> int:
    try:
        value = int(year)
    except (TypeError, ValueError):
        raise InputError(f"year {year!r}", "is not a year", "Give a year such as 2020") from None
    last = last_year()
    if not FIRST_YEAR <= value <= last:
        raise InputError(f"year {value}", f"is outside the AlphaEarth years ({FIRST_YEAR}-{last})",
                         f"Give a year from {FIRST_YEAR} to {last}")
    return value


def source_options(source: str, *, raster: Optional[str | os.PathLike] = None, project: Optional[str] = None,
                   base_url: Optional[str] = None) -> dict[str, Any]:
    """The options ``source`` takes, from what a front end collected (blank text counts as not given).

    Every front end passes all it has; each source gets only its own (the others would be
    refused by ``make_source``). A local source always gets ``raster``, so a missing one is
    its clear error, not an unexpected option.
    """
    check_choice(source, SOURCES, "source")
    if source == "local":
        return {"raster": str(raster) if raster else None}
    key, value = ("project", project) if source == "earthengine" else ("base_url", base_url)
    value = (value or "").strip()
    return {key: value} if value else {}


def make_source(source: str, cache_root: Optional[os.PathLike] = None, **options: Any) -> EmbeddingSource:
    """Build a source by name; unknown names and options are input errors."""
    from .cog import CogSource
    from .earthengine import EarthEngineSource
    from .local import LocalSource

    classes = {"earthengine": EarthEngineSource, "cog": CogSource, "local": LocalSource}
    check_choice(source, SOURCES, "source")
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
          status: Optional[StatusFn] = None, **source_options: Any) -> FetchResult:
    """Fetch the AOI's embeddings for ``year`` from ``source`` into ``out_path``.

    progress(done, total) counts tiles; cancel() returning True stops the fetch with
    core.cancel.Cancelled, leaving no output but keeping finished tiles cached.
    status(message) hears what the fetch is waiting for (index download, retries);
    without it those lines go to the log. Refuses to start, in one line, when the
    output and the tiles still to cache cannot fit on their disks.
    """
    year = check_year(year)
    cache_root = resolve_cache_dir(cache_dir)
    src = make_source(source, cache_root, **source_options)
    src.status_sink = status
    try:
        check_output_path(out_path, *src.inputs())
        out_grid = src.grid_for(aoi, grid)
        cache = (TileCache(cache_root, src.name, year, out_grid.crs, out_grid.resolution)
                 if src.cacheable else None)
        _check_space(out_path, out_grid, src, cache)
        return engine.run(src, aoi, out_grid, year, out_path, cache, progress, cancel)
    finally:
        src.close()


def _device(path: Path) -> int:
    folder = path.absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return os.stat(folder).st_dev


def _check_space(out_path: str | os.PathLike, grid: Grid, src: EmbeddingSource, cache: Optional[TileCache]) -> None:
    """Refuse before any work when the output, and the tiles still to be cached, cannot fit.

    Sizes are core.rasters.raster_bytes' floor for compressed int8 (a quarter of the raw
    64 bytes per pixel), so a refusal means the fetch could not have succeeded.
    """
    output = raster_bytes(grid.width, grid.height, 64, "int8")
    if cache is None:
        ensure_free_space(out_path, output, f"the {grid.width} x {grid.height} px embeddings")
        return
    tiles = plan_tiles(grid, src.tile_size)
    missing = [t for t in tiles if not cache.has(t)]
    tiles_bytes = sum(raster_bytes(t.grid.width, t.grid.height, 64, "int8") for t in missing)
    if _device(Path(out_path)) == _device(cache.folder):
        ensure_free_space(out_path, output + tiles_bytes,
                          f"the {grid.width} x {grid.height} px embeddings with their {len(missing)} cached tiles")
        return
    ensure_free_space(out_path, output, f"the {grid.width} x {grid.height} px embeddings")
    ensure_free_space(cache.folder, tiles_bytes, f"the tile cache ({len(missing)} tiles to fetch)")


def size_limit_gb(value: Optional[float] = None) -> float:
    """The size limit in GB: ``value``, else $ALPHAEARTH_HEIGHT_MAX_GB, else 5."""
    if value is None:
        return positive_from_env(MAX_GB_ENV, DEFAULT_MAX_GB, "gigabytes")
    if not 0 < value < float("inf"):
        raise InputError(f"size limit {value!r} GB", "is not a positive number of gigabytes",
                         f"Give a number such as {DEFAULT_MAX_GB:g}")
    return float(value)


def _gb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def fetch_bytes(info: dict) -> int:
    """The larger of what a fetch downloads and what it writes (the number the limit is about)."""
    return max(int(info.get("download_bytes", 0)), int(info["output_bytes"]))


def describe_size(info: dict) -> str:
    """'download ~2.7 TB and write ~677.4 GB in 76,140 requests over 1,109,809 km²'."""
    parts = []
    if info.get("download_bytes"):
        parts.append(f"download ~{_gb(info['download_bytes'])}")
    parts.append(f"write ~{_gb(info['output_bytes'])}")
    text = " and ".join(parts)
    if info.get("requests"):
        text += f" in {info['requests']:,} requests"
    return text + f" over {info['area_km2']:,.0f} km²"


def check_size(info: dict, limit_gb: Optional[float] = None, allow: str = "Give --yes to go ahead") -> None:
    """Refuse a fetch whose download or output exceeds the limit (``size_limit_gb``).

    ``allow`` says how the user goes ahead anyway (a CLI flag, a Processing parameter).
    """
    limit = size_limit_gb(limit_gb)
    if fetch_bytes(info) > limit * 1e9:
        raise InputError(f"fetch from {info['source']} ({info['year']}, {info['width']:,} x {info['height']:,} px)",
                         f"would {describe_size(info)}, over the {limit:g} GB limit",
                         f"{allow}, or choose a smaller area")


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
             cache_dir: Optional[str | os.PathLike] = None, limit_gb: Optional[float] = None,
             allow: str = "Give --yes to go ahead", online: bool = True, status: Optional[StatusFn] = None,
             cancel: Optional[CancelFn] = None, **source_options: Any) -> dict:
    """Pixels, bytes, tiles and requests a fetch would take, and what the cache already holds.

    With ``limit_gb`` (GB; None: no limit), a fetch over that size is refused
    (``check_size``) before anything online is asked. ``online`` adds what needs the network (the COG files under the
    area, which downloads the tile index once).
    """
    year = check_year(year)
    cache_root = resolve_cache_dir(cache_dir)
    src = make_source(source, cache_root, **source_options)
    src.status_sink = status
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
        if limit_gb is not None:
            check_size(info, limit_gb, allow)
        if online:
            info.update(src.coverage(out_grid, year, cancel))
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
