"""The "cog" source: the public AEF Cloud-Optimized GeoTIFFs, read by HTTP byte ranges.

Only the blocks under the area are downloaded (GDAL /vsicurl/), each at most once per
fetch: the published tiles are 8192² px stored band by band in 1024² ZSTD blocks, so an
output tile reads whole blocks of all 64 bands (~0.6 MB per band per block), and blocks
are shared by neighbouring output tiles. The workers share one store of decoded blocks
(``BlockStore``): a block is read by one worker while the others wait for it, and stays
while later output tiles need it (within ``ALPHAEARTH_HEIGHT_COG_BLOCK_CACHE_MB``). GDAL's
own /vsicurl/ cache cannot do this: its size is fixed by the first /vsicurl/ use in the
process.

The files are int8, companded (core.aef.dequantise) and stored bottom-up, which
core.rasters.EmbeddingRaster undoes. Each COG is read on its own UTM grid; an output tile
in another zone gets the pixel under each of its pixel centres (nearest), its own zone's
files taking priority.

The size estimate counts the blocks the area's output tiles touch, file by file, in the
order they are read, times the blocks' compressed size (from the first tile's header,
read once and cached), plus each file's header.

Network limits (core.fetch.network): a transfer under 1 KB per stall window is cut by
curl's low-speed rule, each HTTP request is cut at the tile's deadline, and a tile's
retries stop at that deadline; HTTP 4xx answers are not retried.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from .. import aef
from ..aoi import AreaOfInterest, bounds_overlap
from ..errors import InputError, RasterReadError, SourceError
from ..cancel import CancelFn
from ..rasters import EmbeddingRaster, Grid
from .base import EmbeddingSource
from ..sizes import positive_from_env
from .cog_index import DEFAULT_BASE_URL, IndexEntry, IndexStats, index_path, index_rows, select_rows, user_agent
from .network import STALL_BYTES, Deadline, NetworkLimits, host_of
from .retry import GaveUp, with_retries
from .sampling import sample_nearest
from .tiling import plan_tiles


# An HTTP 4xx is the server's answer. GDAL's "does not exist in the file system" is not: it
# also comes from its memory of an earlier failed open (another tile's stall), for a while.
_PERMANENT = re.compile(r"HTTP response code: 4\d\d\b")
_HTTP_CODE = re.compile(r"HTTP response code: (\d{3})\b")


def _gdal_failure(exc: BaseException) -> bool:
    """A GDAL open or read failure (raw, or as core.rasters' one-line RasterReadError)."""
    return isinstance(exc, (RasterioIOError, RasterReadError))


def _transient(exc: BaseException) -> bool:
    """GDAL read/open failures (stalls, dropped connections, 5xx after GDAL's own retries).

    An HTTP 4xx is the server's answer (refused, not there) and is not retried.
    """
    return _gdal_failure(exc) and not _PERMANENT.search(str(exc))


def _gdal_reason(exc: BaseException, url: str) -> str:
    text = exc.problem if isinstance(exc, InputError) else str(exc)
    text = " ".join(text.replace(f"/vsicurl/{url}", "the file").split())
    code = _HTTP_CODE.search(text)
    if code:
        return f"HTTP {code.group(1)}"
    if "too slow" in text.lower():
        return "the transfer stalled"
    if "timed out" in text.lower():
        return "the request timed out"
    return text or type(exc).__name__


BLOCK_CACHE_ENV = "ALPHAEARTH_HEIGHT_COG_BLOCK_CACHE_MB"
DEFAULT_BLOCK_CACHE_MB = 1024.0
CHUNK = 16384  # /vsicurl/ reads whole 16 KB chunks


@dataclass(frozen=True)
class TileLayout:
    """How the mirror's tiles are stored: what a size estimate needs to know.

    The published constants are the defaults (8192² px, 1024² blocks, ~0.6 MB per band per
    block); ``read_layout`` measures them on the first tile under the area.
    """

    block: int = 1024
    bands: int = aef.N_BANDS
    band_block_bytes: float = 0.6e6   # mean compressed bytes of one band's block
    header_bytes: int = 96 * 1024     # what opening a tile reads (first chunk, block offsets)


def read_layout(url: str) -> TileLayout:
    """The block size, the mean compressed block size and the header size of one remote tile
    (opened inside the caller's rasterio.Env; reads its header only)."""
    with rasterio.open(f"/vsicurl/{url}") as ds:
        block_h, block_w = ds.block_shapes[0]
        rows, cols = -(-ds.height // block_h), -(-ds.width // block_w)
        sizes = [int(ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=b) or 0)
                 for b in range(1, ds.count + 1) for y in range(rows) for x in range(cols)]
    offsets_bytes = 2 * 8 * len(sizes)  # BigTIFF offsets and byte counts of the full-resolution blocks
    return TileLayout(block=block_w, bands=len(sizes) // (rows * cols),
                      band_block_bytes=sum(sizes) / max(1, len(sizes)),
                      header_bytes=CHUNK + -(-offsets_bytes // CHUNK) * CHUNK)


def offline_download_bytes(width: int, height: int, layout: TileLayout = TileLayout()) -> int:
    """Expected COG download of a ``width`` x ``height`` px area before the index is read
    (the dock, the size limit): whole blocks of all bands, at any alignment on the block
    lattice (w - 1) / B + 1 blocks a side, one tile."""
    blocks = ((max(1, width) - 1) / layout.block + 1) * ((max(1, height) - 1) / layout.block + 1)
    return math.ceil(blocks * layout.bands * (layout.band_block_bytes + CHUNK / 2) + layout.header_bytes)


class BlockStore:
    """Decoded blocks (all bands) of the remote tiles, shared by one fetch's workers.

    A block asked for by several workers at once is read by one of them while the others
    wait; it then stays, least recently used first out, within ``budget`` bytes, so the
    next row of output tiles finds the blocks it shares with this one.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.lock = threading.Lock()
        self.items: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self.loading: dict[tuple, threading.Event] = {}
        self.used = 0
        self.loads = 0

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        while True:
            with self.lock:
                if key in self.items:
                    self.items.move_to_end(key)
                    return self.items[key]
                event = self.loading.get(key)
                mine = event is None
                if mine:
                    event = self.loading[key] = threading.Event()
            if not mine:
                event.wait()  # its reader has deadlines; on its failure the loop reads it here
                continue
            try:
                value = load()
                with self.lock:
                    self.loads += 1
                    self.items[key] = value
                    self.used += value.nbytes
                    while self.used > self.budget and len(self.items) > 1:
                        self.used -= self.items.popitem(last=False)[1].nbytes
                return value
            finally:
                with self.lock:
                    del self.loading[key]
                event.set()

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.used = 0


class _BlockReads:
    """Stands in for a tile's rasterio dataset inside EmbeddingRaster: window reads are
    served from whole blocks of all bands, through the fetch's BlockStore."""

    def __init__(self, ds: rasterio.DatasetReader, url: str, store: BlockStore) -> None:
        self._ds, self._url, self._store = ds, url, store
        self._block_h, self._block_w = ds.block_shapes[0]

    def __getattr__(self, name: str):
        return getattr(self._ds, name)

    def read(self, window: Window) -> np.ndarray:
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        out = np.empty((self._ds.count, r1 - r0, c1 - c0), dtype=self._ds.dtypes[0])
        bh, bw = self._block_h, self._block_w
        for by in range(r0 // bh, (r1 - 1) // bh + 1):
            for bx in range(c0 // bw, (c1 - 1) // bw + 1):
                block = self._store.get((self._url, by, bx), lambda by=by, bx=bx: self._load(by, bx))
                y0, x0 = max(r0, by * bh), max(c0, bx * bw)
                y1, x1 = min(r1, by * bh + block.shape[1]), min(c1, bx * bw + block.shape[2])
                part = block[:, y0 - by * bh:y1 - by * bh, x0 - bx * bw:x1 - bx * bw]
                out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0] = part
        return out

    def _load(self, by: int, bx: int) -> np.ndarray:
        bh, bw = self._block_h, self._block_w
        height, width = min(bh, self._ds.height - by * bh), min(bw, self._ds.width - bx * bw)
        return self._ds.read(window=Window(bx * bw, by * bh, width, height))


class _SharedRaster(EmbeddingRaster):
    """A remote tile opened once per worker and kept open across output tiles."""

    def __init__(self, url: str, store: BlockStore) -> None:
        super().__init__(f"/vsicurl/{url}")
        self._ds = _BlockReads(self._ds, url, store)

    def close(self) -> None:
        self._ds._ds.close()


class CogSource(EmbeddingSource):
    name = "cog"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, cache_root: Optional[Path] = None,
                 tile_size: int = 512, workers: int = 4, retries: int = 5, retry_delay: float = 1.0,
                 stall_timeout: Optional[float] = None, tile_deadline: Optional[float] = None,
                 index_deadline: Optional[float] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_root = cache_root
        self.tile_size, self.workers = tile_size, max(1, workers)
        self.retries, self.retry_delay = max(1, retries), retry_delay
        self.limits = NetworkLimits.from_env(stall_timeout, tile_deadline, index_deadline)
        self._entries: Optional[list[IndexEntry]] = None
        self.index_stats = IndexStats()
        self.blocks = BlockStore(positive_from_env(BLOCK_CACHE_ENV, DEFAULT_BLOCK_CACHE_MB, "megabytes") * 2**20)
        self._local = threading.local()  # each worker's open tiles: url -> _SharedRaster
        self._opened: list[_SharedRaster] = []
        self._opened_lock = threading.Lock()

    def gdal_options(self, request_timeout: float, fresh_url: Optional[str] = None) -> dict:
        """/vsicurl/ settings: our User-Agent, the stall rule (curl's low-speed limit: under
        1 KB per stall window), a per-request timeout, and on a retry no cached failure."""
        stall = self.limits.stall
        options = {"GDAL_HTTP_USERAGENT": user_agent(), "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                   "GDAL_HTTP_MAX_RETRY": "0",
                   "GDAL_HTTP_CONNECTTIMEOUT": str(max(1, math.ceil(stall))),
                   "GDAL_HTTP_LOW_SPEED_TIME": str(max(1, math.ceil(stall))),
                   "GDAL_HTTP_LOW_SPEED_LIMIT": str(max(1, math.ceil(STALL_BYTES / stall))),
                   "GDAL_HTTP_TIMEOUT": str(max(1, math.ceil(request_timeout))),
                   # the 64 band blocks of a block position are far apart: ask for them in parallel,
                   # and as one range where they happen to touch
                   "GDAL_HTTP_MULTIRANGE": "PARALLEL", "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES"}
        if fresh_url:  # GDAL remembers a failed open per URL; a retry must really ask again
            options["CPL_VSIL_CURL_NON_CACHED"] = f"/vsicurl/{fresh_url}"
        return options

    def entries(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> list[IndexEntry]:
        """The tiles under the grid, from a sliver of the index (core.fetch.cog_index.index_rows)."""
        if self._entries is None:
            if self.cache_root is None:
                raise InputError("cog source", "has no cache folder for the tile index", "Give cache_dir")
            rows, self.index_stats = index_rows(self.base_url, self.cache_root, grid, year, cancel=cancel,
                                                retries=self.retries, retry_delay=self.retry_delay,
                                                stall=self.limits.stall, deadline=self.limits.index_deadline,
                                                status=self.status)
            self._entries = select_rows(rows, self.base_url, year, grid)
        return self._entries

    def prepare(self, aoi: AreaOfInterest, grid: Grid, year: int, cancel: Optional[CancelFn]) -> None:
        if not self.entries(grid, year, cancel):
            raise InputError(f"area of interest ({aoi.crs} {tuple(round(v, 4) for v in aoi.bounds)})",
                             f"is not covered by any AlphaEarth COG for {year}",
                             "Check the year (the mirror may lack some years) and the area")

    def read(self, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        out = np.full((aef.N_BANDS, tile.height, tile.width), np.nan, dtype=np.float32)
        for entry in self._covering(tile):
            missing = np.isnan(out).any(axis=0)
            if not missing.any():
                break
            values = self._read_file(entry.url, tile, cancel)
            take = missing & np.isfinite(values).all(axis=0)
            out[:, take] = values[:, take]
        return out

    def _covering(self, tile: Grid) -> list[IndexEntry]:
        """Files meeting the tile, those in the tile's own CRS first (no resampling)."""
        hits = []
        for entry in self._entries or ():
            b = transform_bounds(tile.crs, entry.crs, *tile.bounds, densify_pts=5)
            if bounds_overlap(b, entry.bounds):
                hits.append(entry)
        return sorted(hits, key=lambda e: (e.crs != tile.crs, e.url))

    def _read_file(self, url: str, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        """One COG's pixels under the tile, retried within the tile deadline; failures in one line."""
        deadline = Deadline(self.limits.tile_deadline, "a tile")
        attempts = [0]
        reasons: list[str] = []  # what the attempts met, in order, each once

        def attempt() -> np.ndarray:
            attempts[0] += 1
            return self._sample(url, tile, max(1.0, deadline.left()), retry=attempts[0] > 1)

        def retrying(exc: BaseException, delay: float, n: int) -> None:
            reason = _gdal_reason(exc, url)
            reasons.append(reason) if reason not in reasons else None
            self.status(f"{host_of(url)}: {reason} reading {url.rsplit('/', 1)[-1]}; "
                        f"trying again in {delay:.0f} s (attempt {n + 1} of {self.retries})")

        def met(exc: BaseException) -> str:
            last = _gdal_reason(exc, url)
            return ", then ".join(reasons + ([last] if last not in reasons else []))

        fix = "Check the network connection and the COG base URL, then run again: finished tiles are cached"
        try:
            return with_retries(attempt, transient=_transient, attempts=self.retries, base_delay=self.retry_delay,
                                cancel=cancel, deadline=deadline, min_attempt=self.limits.stall,
                                on_retry=retrying)
        except GaveUp as exc:
            raise SourceError(url, f"could not be read ({met(exc.last)}; gave up within the "
                                  f"{self.limits.tile_deadline:g} s tile deadline after {exc.attempts} attempt(s))",
                             fix) from None
        except (RasterioIOError, InputError) as exc:
            if not _gdal_failure(exc):
                raise
            if not _transient(exc):
                raise SourceError(url, f"was refused by the server ({_gdal_reason(exc, url)})",
                                 "Check the COG base URL (default " + DEFAULT_BASE_URL + ") and the year") from None
            raise SourceError(url, f"could not be read ({met(exc)}; {attempts[0]} attempt(s))", fix) from None

    def _sample(self, url: str, tile: Grid, request_timeout: float, retry: bool = False) -> np.ndarray:
        options = self.gdal_options(request_timeout, url if retry else None)
        with rasterio.Env(**options):
            return sample_nearest(self._raster(url, fresh=retry), tile)

    def _raster(self, url: str, fresh: bool) -> _SharedRaster:
        """This worker's open copy of ``url`` (reopened on a retry: a failed read may leave it broken)."""
        rasters = self._local.__dict__.setdefault("rasters", {})
        if fresh and url in rasters:
            rasters.pop(url).close()
        if url not in rasters:
            rasters[url] = _SharedRaster(url, self.blocks)
            with self._opened_lock:
                self._opened.append(rasters[url])
        return rasters[url]

    def close(self) -> None:
        with self._opened_lock:
            for raster in self._opened:
                raster.close()
            self._opened.clear()
        self.blocks.clear()

    def describe(self) -> str:
        return f"AlphaEarth COGs {self.base_url}"

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        """Offline: whole blocks of all bands under the grid, at the published block size."""
        return {"requests": tiles, "download_bytes": offline_download_bytes(grid.width, grid.height)}

    def coverage(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> dict:
        """Online: the files under the grid and the download their blocks cost.

        Only output tiles not yet cached count; the blocks are counted once each, file by
        file in the order ``read`` takes them, so the number is what a fetch reads.
        """
        from .cache import TileCache

        files = self.entries(grid, year, cancel)
        info = {"files": len(files), "index_bytes_read": self.index_stats.bytes_read,
                "index_bytes": self.index_stats.index_size}
        cache = TileCache(self.cache_root, self.name, year, grid.crs, grid.resolution)
        missing = [t.grid for t in plan_tiles(grid, self.tile_size) if not cache.has(t)]
        blocks = self.block_plan(missing)
        if not blocks:
            return {**info, "download_bytes": 0, "requests": 0, "blocks": 0}
        layout = self.layout(files[0].url)
        urls = {url for url, _, _ in blocks}
        per_block = layout.bands * (layout.band_block_bytes + CHUNK / 2)  # a read ends on a chunk edge
        return {**info, "blocks": len(blocks), "requests": len(blocks) * layout.bands + 2 * len(urls),
                "download_bytes": math.ceil(len(blocks) * per_block + len(urls) * layout.header_bytes)}

    def block_plan(self, tiles: list[Grid]) -> set[tuple[str, int, int]]:
        """(url, block row, block col) of every block the output tiles read, rows as stored."""
        blocks: set[tuple[str, int, int]] = set()
        for tile in tiles:
            for entry in self._covering(tile):
                if self._blocks_under(entry, tile, self.layout(entry.url).block, blocks):
                    break  # read stops at the first file covering the whole tile
        return blocks

    @staticmethod
    def _blocks_under(entry: IndexEntry, tile: Grid, block: int, blocks: set) -> bool:
        """Add the blocks of ``entry`` under ``tile``; whether the entry covers the whole tile."""
        west, south, east, north = transform_bounds(tile.crs, entry.crs, *tile.bounds, densify_pts=5)
        e_west, e_south, e_east, e_north = entry.bounds
        res = 10.0
        rows = round((e_north - e_south) / res)
        c0, c1 = max(0.0, (west - e_west) / res), min((e_east - e_west) / res, (east - e_west) / res)
        r0, r1 = max(0.0, (e_north - north) / res), min(float(rows), (e_north - south) / res)
        if c1 <= c0 or r1 <= r0:
            return False
        stored0, stored1 = rows - r1, rows - r0  # stored bottom-up
        for by in range(int(stored0) // block, (math.ceil(stored1) - 1) // block + 1):
            for bx in range(int(c0) // block, (math.ceil(c1) - 1) // block + 1):
                blocks.add((entry.url, by, bx))
        return west >= e_west and east <= e_east and south >= e_south and north <= e_north

    def layout(self, url: str) -> TileLayout:
        """The tiles' layout, measured on one tile's header once per mirror and cached."""
        if getattr(self, "_layout", None) is not None:
            return self._layout
        path = index_path(self.base_url, self.cache_root).with_suffix(".layout.json") if self.cache_root else None
        if path is not None and path.is_file():
            try:
                self._layout = TileLayout(**json.loads(path.read_text(encoding="utf-8")))
                return self._layout
            except (ValueError, TypeError):
                pass
        try:
            with rasterio.Env(**self.gdal_options(self.limits.tile_deadline)):
                self._layout = read_layout(url)
        except (RasterioIOError, ValueError, TypeError) as exc:
            self.status(f"could not read the block layout of {url.rsplit('/', 1)[-1]} ({_gdal_reason(exc, url)}): "
                        "estimating with the published one (1024² blocks, ~0.6 MB per band per block)")
            return TileLayout()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self._layout)), encoding="utf-8")
        return self._layout
