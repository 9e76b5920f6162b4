"""The Copernicus DEM (GLO-30, GLO-90) from its public Cloud-Optimized GeoTIFFs, onto any grid.

Layout of the public buckets (no account needed): ``{base}/{tile}/{tile}.tif`` with
``tile = Copernicus_DSM_COG_{10|30}_{N|S}{lat:02}_00_{E|W}{lon:03}_00_DEM``: one file per
1° x 1° cell, named by its south-west corner; EPSG:4326, float32 heights above the EGM2008
geoid, pixel-is-point (the top row lies on the cell's north edge, the first column on its
west edge). Pixels are 1 (GLO-30) or 3 (GLO-90) arc-seconds high and widen with latitude
(fewer columns per degree above 50°, 60°, 70°, 80° and 85°): sizes and georeferencing are
read from each file, never assumed. Cells over open sea have no file (HTTP 404): the
terrain is 0 m there, as the DEM itself has on sea pixels inside coastal tiles.

Only the internal blocks under the area are read (GDAL /vsicurl/ HTTP range requests),
and each block is cached as a small checksummed GeoTIFF (like the embedding tiles of
core.fetch.cache), so a repeated or overlapping area reads nothing twice and an
interrupted one resumes. The blocks of tiles sharing a pixel size are mosaicked (a VRT)
and warped onto the target grid, bilinear, or averaged where the target's pixels are
larger than the DEM's; groups of different pixel size (an area across a latitude where
tiles get narrower) are warped one after the other, the finest first, then sea cells
are set to 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..aoi import AreaOfInterest, work_crs
from ..cancel import Cancelled, CancelFn, ProgressFn
from ..dem import ATTRIBUTION, LICENCE, MARGIN_PX, SEA_NOTE, VERTICAL_DATUM, DemProduct
from ..errors import InputError, SourceError
from ..rasters import (OUTPUT_NODATA, Grid, atomic_write, check_output_path, float_profile, grow_grid,
                       remove_stale_partials_once, replace_when_done)
from .cache import resolve_cache_dir
from .cog_index import user_agent
from .retry import with_retries

log = logging.getLogger("alphaearth_height.fetch")
StatusFn = Callable[[str], None]

CACHE_FOLDER = "copernicus"
CHECKSUM_TAG = "AEH_SHA256"
WGS84 = CRS.from_epsg(4326)
PAD_PX = 2              # DEM pixels read past the area on every side (bilinear needs 1)
SELECT_PAD_DEG = 0.02   # cells within this of the area are looked at (their real pixel size decides)
BLOCK = 1024            # output rows/columns warped at a time
STALL_S, REQUEST_S = 30, 120
# published columns per degree of GLO-30 by latitude band (GLO-90: a third); only used to
# decide which neighbouring cells may matter, never for reading
_WIDTHS = ((50, 3600), (60, 2400), (70, 1800), (80, 1200), (85, 720), (90, 360))


def tile_name(p: DemProduct, lat: int, lon: int) -> str:
    """``Copernicus_DSM_COG_10_N44_00_W001_00_DEM`` for the cell whose south-west corner is (lat, lon)."""
    ns, ew = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
    return f"Copernicus_DSM_COG_{p.code}_{ns}{abs(lat):02d}_00_{ew}{abs(lon):03d}_00_DEM"


def tile_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{name}/{name}.tif"


def nominal_degrees_per_px(p: DemProduct, lat: float) -> float:
    """Published column width (degrees) at a latitude: a hint for choosing cells, not for reading."""
    for limit, columns in _WIDTHS:
        if abs(lat) < limit:
            return p.arcsec * 3600 / columns / 3600
    return p.arcsec * 10 / 3600


def cells_for(bounds: tuple[float, float, float, float], p: DemProduct) -> list[tuple[int, int]]:
    """(lat, lon) south-west corners of the 1° cells that may hold pixels for ``bounds`` (lon/lat)."""
    west, south, east, north = bounds
    pad_lat = max(SELECT_PAD_DEG, PAD_PX * p.arcsec / 3600)
    pad_lon = max(SELECT_PAD_DEG, PAD_PX * max(nominal_degrees_per_px(p, south), nominal_degrees_per_px(p, north)))
    lat0, lat1 = max(-90, math.floor(south - pad_lat)), min(89, math.floor(north + pad_lat))
    lon0, lon1 = math.floor(west - pad_lon), math.floor(east + pad_lon)
    if lon1 - lon0 > 180:
        raise InputError(f"area {tuple(round(v, 3) for v in bounds)}", "spans more than 180° of longitude "
                         "(or the antimeridian)", "Give a smaller area, on one side of the antimeridian")
    return [(lat, ((lon + 180) % 360) - 180) for lat in range(lat0, lat1 + 1) for lon in range(lon0, lon1 + 1)]


# ---- the cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileInfo:
    """What a DEM file says about itself (cached in tile.json so a cached area needs no request)."""

    width: int
    height: int
    transform: tuple[float, ...]
    block: tuple[int, int]      # (rows, cols) of its internal blocks
    nodata: Optional[float]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    @property
    def resolution(self) -> tuple[float, float]:
        return abs(self.transform[0]), abs(self.transform[4])


def _checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_when_done(path) as tmp:
        Path(tmp).write_bytes(data)


class DemCache:
    """``<cache>/copernicus/<GLO-30>/<tile>/``: tile.json and one GeoTIFF per internal block read;
    ``absent/<hash of the base URL>/<tile>`` marks cells that have no file there (sea)."""

    def __init__(self, root: Path, p: DemProduct, base_url: str) -> None:
        self.folder = root / CACHE_FOLDER / p.name
        self.absent_folder = self.folder / "absent" / hashlib.sha1(base_url.encode()).hexdigest()[:12]
        self.discarded = 0

    def info(self, tile: str) -> Optional[TileInfo]:
        path = self.folder / tile / "tile.json"
        try:
            data = json.loads(path.read_text())
            return TileInfo(int(data["width"]), int(data["height"]), tuple(float(v) for v in data["transform"]),
                            (int(data["block"][0]), int(data["block"][1])),
                            None if data["nodata"] is None else float(data["nodata"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, IndexError):
            self.discarded += 1
            path.unlink(missing_ok=True)
            return None

    def store_info(self, tile: str, info: TileInfo) -> None:
        data = {"width": info.width, "height": info.height, "transform": list(info.transform),
                "block": list(info.block), "nodata": info.nodata}
        _atomic_bytes(self.folder / tile / "tile.json", (json.dumps(data) + "\n").encode())

    def is_absent(self, tile: str) -> bool:
        return (self.absent_folder / tile).is_file()

    def mark_absent(self, tile: str) -> None:
        _atomic_bytes(self.absent_folder / tile, b"")

    def block_path(self, tile: str, window: Window) -> Path:
        c, r, w, h = (int(v) for v in (window.col_off, window.row_off, window.width, window.height))
        return self.folder / tile / f"{c}_{r}_{w}x{h}.tif"

    def has_block(self, tile: str, window: Window) -> bool:
        """A cached block that opens, has its shape and matches its checksum (else it is deleted)."""
        path = self.block_path(tile, window)
        if not path.is_file():
            return False
        try:
            with rasterio.open(path) as src:
                values, recorded = src.read(1), src.tags().get(CHECKSUM_TAG)
        except Exception:  # noqa: BLE001 - whatever GDAL makes of a damaged file, it is not a block
            values, recorded = None, None
        if (values is None or recorded is None or values.shape != (int(window.height), int(window.width))
                or _checksum(values) != recorded):
            self.discarded += 1
            path.unlink(missing_ok=True)
            return False
        return True

    def store_block(self, tile: str, window: Window, info: TileInfo, values: np.ndarray) -> None:
        """Heights of one block (NaN = no data) as a float32 GeoTIFF, written atomically."""
        path = self.block_path(tile, window)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials_once(path.parent)
        profile = {"driver": "GTiff", "dtype": "float32", "count": 1, "width": values.shape[1],
                   "height": values.shape[0], "crs": WGS84, "nodata": float("nan"),
                   "transform": info.affine * Affine.translation(window.col_off, window.row_off),
                   "compress": "deflate", "predictor": 3, "tiled": values.shape[0] >= 256 and values.shape[1] >= 256}
        with replace_when_done(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(values.astype(np.float32, copy=False), 1)
            dst.update_tags(**{CHECKSUM_TAG: _checksum(values)})


# ---- reading the remote files ----------------------------------------------------------------


def _gdal_options() -> dict:
    """/vsicurl/ settings: our User-Agent, no directory listing, a stall rule and a request timeout."""
    return {"GDAL_HTTP_USERAGENT": user_agent(), "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
            "GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "1", "GDAL_HTTP_CONNECTTIMEOUT": str(STALL_S),
            "GDAL_HTTP_LOW_SPEED_TIME": str(STALL_S), "GDAL_HTTP_LOW_SPEED_LIMIT": "34",
            "GDAL_HTTP_TIMEOUT": str(REQUEST_S), "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif"}


def _http_code(exc: BaseException) -> Optional[int]:
    text = str(exc)
    marker = "HTTP response code: "
    if marker in text:
        with contextlib.suppress(ValueError):
            return int(text.split(marker, 1)[1][:3])
    return None


def _absent(exc: BaseException) -> bool:
    """The server answered that the file is not there (HTTP 404): a cell over open sea.

    Only an answer counts: a connection that failed (GDAL then also says, for a while,
    that the file "does not exist in the file system") is never taken for sea.
    """
    return isinstance(exc, RasterioIOError) and _http_code(exc) == 404


def _transient(exc: BaseException) -> bool:
    """Dropped connections, stalls and 5xx after GDAL's own retries; a 4xx is an answer."""
    code = _http_code(exc)
    return isinstance(exc, RasterioIOError) and not (code is not None and 400 <= code < 500)


@dataclass
class FetchStats:
    cells: list[str] = field(default_factory=list)      # files read from (or cached)
    absent: list[str] = field(default_factory=list)     # cells without a file: sea
    blocks_fetched: int = 0
    blocks_cached: int = 0


def _read_remote(url: str, want: Callable[[TileInfo], list[Window]], retries: int, retry_delay: float,
                 cancel: Optional[CancelFn]) -> tuple[TileInfo, dict]:
    """Open one DEM file over HTTP: its TileInfo, and the blocks ``want(info)`` names (NaN = no data).

    RasterioIOError escapes only for a file that is not there (sea); other failures are
    retried, then reported in one line.
    """
    def call(fn):
        try:
            return with_retries(fn, transient=_transient, attempts=retries, base_delay=retry_delay, cancel=cancel)
        except RasterioIOError as exc:
            if _absent(exc):
                raise
            code = _http_code(exc)
            reason = f"HTTP {code}" if code else " ".join(str(exc).replace(f"/vsicurl/{url}", "the file").split())
            reason = reason.replace("CURL error: ", "")
            raise SourceError(url, f"could not be read ({reason})",
                             "Check the network and the Copernicus DEM base URL, then run again: "
                             "blocks already read are cached") from None

    attempts = [0]

    def open_file():
        attempts[0] += 1
        fresh = {"CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{url}"} if attempts[0] > 1 else {}
        with rasterio.Env(**fresh):  # GDAL remembers a failed open per URL: a retry must really ask again
            return rasterio.open(f"/vsicurl/{url}")

    with rasterio.Env(**_gdal_options()):
        with call(open_file) as src:
            if src.crs is None or src.crs.to_epsg() != 4326 or src.count != 1:
                raise InputError(url, "is not a single-band EPSG:4326 raster like the Copernicus DEM",
                                 "Check the Copernicus DEM base URL")
            rows, cols = src.block_shapes[0]
            info = TileInfo(src.width, src.height, tuple(src.transform)[:6], (int(rows), int(cols)), src.nodata)
            blocks = {}
            for block in want(info):
                if cancel is not None and cancel():
                    raise Cancelled()
                values = call(lambda: src.read(1, window=block, masked=True))
                heights = values.filled(np.nan).astype(np.float32)
                if info.nodata is not None and not math.isnan(info.nodata):
                    heights[heights == np.float32(info.nodata)] = np.nan
                blocks[(int(block.col_off), int(block.row_off), int(block.width), int(block.height))] = heights
    return info, blocks


def _needed_window(info: TileInfo, bounds: tuple[float, float, float, float]) -> Optional[Window]:
    """The tile's pixels under ``bounds`` (lon/lat) plus PAD_PX, snapped out to its internal blocks."""
    inverse = ~info.affine
    west, south, east, north = bounds
    cols, rows = zip(*(inverse * (x, y) for x in (west, east) for y in (south, north)))
    c0, c1 = max(0, math.floor(min(cols)) - PAD_PX), min(info.width, math.ceil(max(cols)) + PAD_PX)
    r0, r1 = max(0, math.floor(min(rows)) - PAD_PX), min(info.height, math.ceil(max(rows)) + PAD_PX)
    if c1 <= c0 or r1 <= r0:
        return None
    by, bx = info.block
    c0, r0 = c0 // bx * bx, r0 // by * by
    c1, r1 = min(info.width, -(-c1 // bx) * bx), min(info.height, -(-r1 // by) * by)
    return Window(c0, r0, c1 - c0, r1 - r0)


def _blocks(info: TileInfo, window: Window) -> list[Window]:
    by, bx = info.block
    c0, r0 = int(window.col_off), int(window.row_off)
    c1, r1 = c0 + int(window.width), r0 + int(window.height)
    return [Window(c, r, min(bx, info.width - c), min(by, info.height - r))
            for r in range(r0, r1, by) for c in range(c0, c1, bx)]


@dataclass
class _Group:
    """Cached blocks of tiles sharing one pixel size (one VRT)."""

    resolution: tuple[float, float]
    blocks: list[tuple[Path, Affine, int, int]] = field(default_factory=list)


def _gather(p: DemProduct, base_url: str, bounds: tuple[float, float, float, float], cache: DemCache,
            stats: FetchStats, retries: int, retry_delay: float, progress: Optional[ProgressFn],
            cancel: Optional[CancelFn], status: StatusFn) -> list[_Group]:
    """Make sure every block under ``bounds`` is cached; the blocks grouped by pixel size."""
    cells = cells_for(bounds, p)
    groups: dict[tuple[float, float], _Group] = {}
    for done, (lat, lon) in enumerate(cells, start=1):
        if cancel is not None and cancel():
            raise Cancelled()
        name = tile_name(p, lat, lon)
        if cache.is_absent(name):
            stats.absent.append(name)
            continue
        info = cache.info(name)

        def missing(of: TileInfo) -> list[Window]:
            window = _needed_window(of, bounds)
            return [b for b in _blocks(of, window) if not cache.has_block(name, b)] if window else []

        todo = missing(info) if info is not None else None
        if todo is None or todo:
            try:
                info, fetched = _read_remote(tile_url(base_url, name), lambda of: todo if todo else missing(of),
                                             retries, retry_delay, cancel)
            except RasterioIOError as exc:  # only a file that is not there gets here
                status(f"{name}: no file at {base_url} ({exc}): open sea, 0 m")
                cache.mark_absent(name)
                stats.absent.append(name)
                continue
            cache.store_info(name, info)
            for (c, r, w, h), values in fetched.items():
                cache.store_block(name, Window(c, r, w, h), info, values)
            stats.blocks_fetched += len(fetched)
        window = _needed_window(info, bounds)
        if window is not None:
            stats.cells.append(name)
            key = (round(info.resolution[0], 12), round(info.resolution[1], 12))
            group = groups.setdefault(key, _Group(info.resolution))
            for block in _blocks(info, window):
                group.blocks.append((cache.block_path(name, block),
                                     info.affine * Affine.translation(block.col_off, block.row_off),
                                     int(block.width), int(block.height)))
        if progress:
            progress(done, len(cells))
    stats.blocks_cached = sum(len(g.blocks) for g in groups.values()) - stats.blocks_fetched
    return sorted(groups.values(), key=lambda g: g.resolution[0] * g.resolution[1])


def _vrt(group: _Group) -> str:
    """A VRT mosaic of one group's blocks (all on one pixel lattice); no source there = NaN."""
    res_x, res_y = group.resolution
    left = min(t.c for _, t, _, _ in group.blocks)
    top = max(t.f for _, t, _, _ in group.blocks)
    right = max(t.c + w * res_x for _, t, w, _ in group.blocks)
    bottom = min(t.f - h * res_y for _, t, _, h in group.blocks)
    width, height = round((right - left) / res_x), round((top - bottom) / res_y)
    sources = []
    for path, t, w, h in group.blocks:
        x, y = round((t.c - left) / res_x), round((top - t.f) / res_y)
        sources.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(path))}</SourceFilename>'
                       f'<SourceBand>1</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                       f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/></SimpleSource>')
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(WGS84.to_wkt())}</SRS>'
            f'<GeoTransform>{left!r}, {res_x!r}, 0, {top!r}, 0, {-res_y!r}</GeoTransform>'
            f'<VRTRasterBand dataType="Float32" band="1"><NoDataValue>nan</NoDataValue>{"".join(sources)}'
            f'</VRTRasterBand></VRTDataset>')


def _resampling(group: _Group, grid: Grid) -> Resampling:
    """Average when the grid's pixels are larger than the DEM's (at the grid's centre), else bilinear."""
    cx, cy = grid.transform * (grid.width / 2, grid.height / 2)
    (lon,), (lat,) = transform_points(grid.crs, WGS84, [cx], [cy])
    res_x, res_y = group.resolution
    box = transform_bounds(WGS84, grid.crs, lon, lat, lon + res_x, lat + res_y)
    dem_area = abs((box[2] - box[0]) * (box[3] - box[1]))
    return Resampling.average if dem_area < grid.resolution[0] * grid.resolution[1] else Resampling.bilinear


def _sea_mask(absent: list[str], grid: Grid, window: Window, p: DemProduct, near: float) -> np.ndarray:
    """Pixels of the window whose centre lies in, or within ``near`` degrees of, a cell without a DEM file.

    (Only pixels no tile gave a value are set from this: the strip between a land tile's
    last pixel and a sea cell belongs to neither tile's pixels.)
    """
    shape = (int(window.height), int(window.width))
    if not absent:
        return np.zeros(shape, dtype=bool)
    cols, rows = np.meshgrid(np.arange(shape[1]) + 0.5 + window.col_off, np.arange(shape[0]) + 0.5 + window.row_off)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    lon, lat = (np.asarray(v) for v in transform_points(grid.crs, WGS84, xs, ys))
    sea = {tuple(int(v) for v in name_cell) for name_cell in (_cell_of(n) for n in absent)}
    hit = np.zeros(lon.shape, dtype=bool)
    for dlon, dlat in ((0, 0), (near, 0), (-near, 0), (0, near), (0, -near)):
        # a pixel-is-point cell holds centres from just above its south edge to its north edge
        cell_lat, cell_lon = np.ceil(lat + dlat).astype(int) - 1, np.floor(lon + dlon).astype(int)
        hit |= np.fromiter(((la, lo) in sea for la, lo in zip(cell_lat.tolist(), cell_lon.tolist())), bool, lon.size)
    return hit.reshape(shape)


def _cell_of(name: str) -> tuple[int, int]:
    """(lat, lon) of a tile name: the inverse of ``tile_name``."""
    parts = name.split("_")
    lat, lon = parts[4], parts[6]
    return (int(lat[1:]) * (1 if lat[0] == "N" else -1), int(lon[1:]) * (1 if lon[0] == "E" else -1))


@dataclass
class TerrainResult:
    path: Path
    grid: Grid
    product: str
    base_url: str
    resampling: str
    cells: list[str]
    absent: list[str]
    blocks_fetched: int
    blocks_cached: int
    valid_fraction: float
    seconds: float

    def summary(self) -> str:
        sea = f", {len(self.absent)} absent (sea, 0 m)" if self.absent else ""
        return (f"wrote {self.path} ({self.grid.width}x{self.grid.height} px in {self.grid.crs.to_string()}, "
                f"{self.product} {self.resampling}; {len(self.cells)} DEM tile(s) read{sea}; blocks: "
                f"{self.blocks_fetched} fetched, {self.blocks_cached} from cache; {self.valid_fraction:.0%} "
                f"with data; {self.seconds:.1f} s)")


def fetch_terrain(grid: Grid, out_path: str | os.PathLike, p: DemProduct, *, base_url: Optional[str] = None,
                  cache_dir: Optional[str | os.PathLike] = None, retries: int = 4, retry_delay: float = 1.0,
                  progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                  status: Optional[StatusFn] = None) -> TerrainResult:
    """The Copernicus DEM on ``grid`` (float32 GeoTIFF, nodata -9999, attribution in its tags)."""
    started = time.perf_counter()
    base = p.base_url(base_url)
    out = check_output_path(out_path)
    say = status or (lambda message: log.info("%s", message))
    bounds = transform_bounds(grid.crs, WGS84, *grid.bounds, densify_pts=21)
    cache = DemCache(resolve_cache_dir(cache_dir), p, base)
    stats = FetchStats()
    groups = _gather(p, base, bounds, cache, stats, max(1, retries), retry_delay, progress, cancel, say)
    if not groups and not stats.absent:
        raise InputError(f"area {tuple(round(v, 4) for v in bounds)} (lon/lat)", "is outside the Copernicus DEM",
                         "Check the area")
    if not groups:
        raise InputError(f"area {tuple(round(v, 4) for v in bounds)} (lon/lat)",
                         f"has no Copernicus DEM {p.name} tile at {base} (open sea, or a wrong base URL)",
                         f"Check the area, and the base URL (default {p.default_url}; ${p.url_env})")
    resampling = _resampling(groups[0], grid)
    near = max(max(g.resolution) for g in groups)
    valid = 0
    with contextlib.ExitStack() as stack:
        warped = []
        for group in groups:
            mem = stack.enter_context(MemoryFile(_vrt(group).encode(), ext=".vrt"))
            src = stack.enter_context(mem.open())
            warped.append(stack.enter_context(WarpedVRT(
                src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=resampling, dtype="float32", src_nodata=float("nan"), nodata=float("nan"), tolerance=0.001)))
        with atomic_write(out) as tmp:
            with rasterio.open(tmp, "w", **float_profile(grid)) as dst:
                dst.set_band_description(1, f"Copernicus DEM {p.name} surface height")
                dst.update_tags(1, UNITS="m")
                dst.update_tags(
                    ATTRIBUTION=ATTRIBUTION, LICENCE=LICENCE, SOURCE=f"Copernicus DEM {p.name} ({base})",
                    TERRAIN_PRODUCT=p.key, VERTICAL_DATUM=VERTICAL_DATUM, RESAMPLING=resampling.name,
                    COPERNICUS_TILES=",".join(stats.cells), COPERNICUS_ABSENT_TILES=",".join(stats.absent) or "none",
                    SEA=SEA_NOTE, SOFTWARE="AlphaEarth Height")
                for r in range(0, grid.height, BLOCK):
                    for c in range(0, grid.width, BLOCK):
                        if cancel is not None and cancel():
                            raise Cancelled()
                        window = Window(c, r, min(BLOCK, grid.width - c), min(BLOCK, grid.height - r))
                        height = np.full((int(window.height), int(window.width)), np.nan, dtype=np.float32)
                        for vrt in warped:
                            values = vrt.read(1, window=window)
                            take = np.isnan(height) & np.isfinite(values)
                            height[take] = values[take]
                        height[np.isnan(height) & _sea_mask(stats.absent, grid, window, p, near)] = 0.0
                        ok = np.isfinite(height)
                        valid += int(ok.sum())
                        dst.write(np.where(ok, height, OUTPUT_NODATA).astype(np.float32), 1, window=window)
    return TerrainResult(out, grid, p.name, base, resampling.name, stats.cells, stats.absent, stats.blocks_fetched,
                         stats.blocks_cached, valid / max(1, grid.width * grid.height), time.perf_counter() - started)


def aoi_grid(aoi: AreaOfInterest, resolution: float = 10.0, margin_m: float = 0.0) -> Grid:
    """A north-up grid over the AOI plus ``margin_m`` in the UTM zone of its centre, snapped to
    multiples of ``resolution`` (at 10 m: the lattice of the embeddings ``fetch`` gives the AOI)."""
    if not resolution > 0 or margin_m < 0:
        raise InputError(f"resolution {resolution} / margin {margin_m}", "must be positive / not negative",
                         "Give e.g. --resolution 10 --margin 1000")
    crs = CRS.from_user_input(work_crs(aoi))
    xmin, ymin, xmax, ymax = aoi.bounds_in(crs)
    xmin, ymin, xmax, ymax = xmin - margin_m, ymin - margin_m, xmax + margin_m, ymax + margin_m
    x0, y1 = math.floor(xmin / resolution) * resolution, math.ceil(ymax / resolution) * resolution
    x1, y0 = math.ceil(xmax / resolution) * resolution, math.floor(ymin / resolution) * resolution
    return Grid(crs, Affine(resolution, 0.0, x0, 0.0, -resolution, y1),
                max(1, round((x1 - x0) / resolution)), max(1, round((y1 - y0) / resolution)))


def _grid_key(p: DemProduct, base: str, grid: Grid) -> str:
    text = json.dumps([p.key, base, grid.crs.to_wkt(), list(grid.transform)[:6], grid.width, grid.height])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def terrain_for_grid(p: DemProduct, grid: Grid, *, cache_dir: Optional[str | os.PathLike] = None,
                     base_url: Optional[str] = None, cancel: Optional[CancelFn] = None,
                     status: Optional[StatusFn] = None) -> Path:
    """The DEM on ``grid`` grown by MARGIN_PX (same lattice), kept in the cache under a name
    derived from the grid: the terrain input ``copernicus-30`` of train, predict and evaluate."""
    base = p.base_url(base_url)
    root = resolve_cache_dir(cache_dir)
    path = root / CACHE_FOLDER / "grids" / f"{p.key}-{_grid_key(p, base, grid)}.tif"
    if path.is_file():
        try:
            with rasterio.open(path) as src:
                if src.tags().get("TERRAIN_PRODUCT") == p.key and src.count == 1:
                    return path
        except Exception:  # noqa: BLE001 - damaged: fetch it again (its blocks are cached)
            pass
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = fetch_terrain(grow_grid(grid, MARGIN_PX), path, p, base_url=base, cache_dir=root, cancel=cancel,
                           status=status)
    (status or (lambda message: log.info("%s", message)))(result.summary())
    return path
