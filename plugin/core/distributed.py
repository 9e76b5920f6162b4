"""Prediction and fetch on a Dask cluster: an area cut into chunks, one task per chunk.

Why chunks and not one big run: a whole country is hours of prediction on one machine,
and each chunk is independent once it carries enough context. Each task reads its
embeddings window (a local raster or a VRT on storage every worker sees), predicts it
with the same ``predict_height`` a single process uses, and writes its own GeoTIFF; the
client only assembles a VRT (and optionally one GeoTIFF or COG) from the finished files.

Exactness: the prediction blends overlapping tiles, so a pixel's value depends on which
tiles cover it, and the tile layout (``inference.tile_layout``: tile size and evenly
spread starts) depends on the whole raster's size. A crop predicted on its own would be
cut into other tiles (metres of difference). So a chunk task does not predict a crop:
it runs exactly the whole raster's tiles that touch its interior, with the same size,
starts, blend weights and order of accumulation, and keeps the interior; the result
equals the single-process one up to float rounding from batch composition.

Terrain: a model trained on height above a coarse terrain predicts the relief in each
chunk as on one process, and the chunk adds the terrain warped onto the whole raster's
grid and read over its interior (the very warp ``terrain.predict_surface`` reads block by
block). The client resolves the terrain once (a DEM product is fetched into the cache);
every worker reads that one file.

Uncertainty: with ``uncertainty`` each chunk runs the model wrapped as
``uncertainty.predict_uncertainty`` wraps it (the spread over 8 flips/rotations, torch
only) through the same tiles, blend and assembly, and writes the same band description
and tags. It needs no terrain (the spread of the relief is the spread of the height),
and its chunks are of their own run (``"uncertainty": true`` in the manifest).

Resume: a chunk's GeoTIFF appears only when whole (``atomic_write``), so its existence is
the "finished" marker; a re-run skips those. A task that fails is retried (and a task
whose worker dies is re-run elsewhere by the scheduler); one still failing is reported
in one line naming the chunk.

Dask is imported only here, and only when a cluster is asked for (``--workers``,
``--scheduler``): the plugin and the single-process CLI never need it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from . import aef
from .errors import InputError
from .rasters import OUTPUT_NODATA, EmbeddingRaster, Grid, atomic_write, float_profile
from .resample import ReferenceOnGrid
from .terrain import needs_terrain, terrain_on_embeddings_grid, terrain_tags

DEFAULT_CHUNK = 2048        # px a side of a chunk's interior: ~4 Mpx, minutes of CPU per task
DEFAULT_RETRIES = 2         # tries after the first for a task that raised
CHUNKS_SUFFIX = ".chunks"   # folder of chunk GeoTIFFs beside the output

StatusFn = Callable[[str], None]


# ---------------------------------------------------------------- geometry

def touching(starts: Sequence[int], size: int, lo: int, hi: int) -> list[int]:
    """The tile starts (tiles of ``size`` px) that touch [lo, hi): every tile a pixel there is blended from."""
    return [s for s in starts if s < hi and s + size > lo]


@dataclass(frozen=True)
class Chunk:
    """One task's area: ``inner`` is written; ``rows``/``cols`` are the whole raster's tiles touching it.

    ``outer`` is the window those tiles cover (the context read around ``inner``); it can
    pass the raster's edge where the raster is smaller than a tile, as the whole run's does.
    """

    row: int
    col: int
    inner: Window
    outer: Window
    rows: tuple[int, ...] = ()
    cols: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """Stable across runs (resume) and readable in an error message."""
        return f"chunk-r{self.row:03d}-c{self.col:03d}"


@dataclass(frozen=True)
class Layout:
    """The whole raster's tiles: size and starts along each axis (``inference.tile_layout``)."""

    th: int
    rows: tuple[int, ...]
    tw: int
    cols: tuple[int, ...]

    @classmethod
    def of(cls, width: int, height: int, tile: int, overlap: int, multiple: int) -> "Layout":
        from .inference import tile_layout

        th, rows = tile_layout(height, tile, overlap, multiple)
        tw, cols = tile_layout(width, tile, overlap, multiple)
        return cls(th, tuple(rows), tw, tuple(cols))


def plan_chunks(width: int, height: int, chunk_size: int, layout: Optional[Layout] = None) -> list[Chunk]:
    """Cut a width x height raster into chunks of ``chunk_size`` px a side (the last ones smaller).

    With a prediction's ``layout`` each chunk lists the tiles touching it and its context
    window; without (a fetch) the context is the chunk itself.
    """
    if chunk_size < 1:
        raise InputError(f"chunk size {chunk_size}", "must be a positive number of pixels",
                         f"Use e.g. --chunk-size {DEFAULT_CHUNK}")
    if layout and chunk_size < max(layout.th, layout.tw):
        tile = max(layout.th, layout.tw)
        raise InputError(f"chunk size {chunk_size}", f"is smaller than the prediction tile ({tile} px)",
                         f"Use --chunk-size {tile} or more (a few thousand px is usual)")
    chunks = []
    for i, r0 in enumerate(range(0, height, chunk_size)):
        r1 = min(r0 + chunk_size, height)
        for j, c0 in enumerate(range(0, width, chunk_size)):
            c1 = min(c0 + chunk_size, width)
            inner = Window(c0, r0, c1 - c0, r1 - r0)
            if layout is None:
                chunks.append(Chunk(i, j, inner, inner))
                continue
            rows = touching(layout.rows, layout.th, r0, r1)
            cols = touching(layout.cols, layout.tw, c0, c1)
            outer = Window(cols[0], rows[0], cols[-1] + layout.tw - cols[0], rows[-1] + layout.th - rows[0])
            chunks.append(Chunk(i, j, inner, outer, tuple(rows), tuple(cols)))
    return chunks


def sub_grid(grid: Grid, window: Window) -> Grid:
    """The grid of ``window`` of ``grid`` (same pixel lattice)."""
    return Grid(grid.crs, grid.transform * Affine.translation(window.col_off, window.row_off),
                int(window.width), int(window.height))


# ---------------------------------------------------------------- the cluster

@contextlib.contextmanager
def open_client(workers: Optional[int] = None, scheduler: Optional[str] = None) -> Iterator[Any]:
    """A Dask client: on a ``LocalCluster`` of ``workers`` processes, or on ``scheduler``'s cluster.

    Local workers are processes (the model runners hold the GIL) with one thread each and
    listen on 127.0.0.1 only, the scheduler's HTTP endpoints too (on a free port: a fixed
    8787 clashes with any other cluster on the machine).
    """
    if bool(workers) == bool(scheduler):
        raise InputError("--workers/--scheduler", "need exactly one of the two",
                         "Give --workers N for a cluster on this machine, or --scheduler tcp://HOST:PORT")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}", "must be at least 1", "Give --workers 2 or more")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--workers/--scheduler", "need Dask, which is not installed",
                         "Install the extra: pip install 'alphaearth-height[dask]' "
                         "(or pip install dask distributed)") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise InputError(f"Dask scheduler {scheduler}", f"could not be reached ({exc})",
                             "Start it (dask-scheduler) and check the address and port") from None
        except (MemoryError, TypeError, ValueError) as exc:  # another server's reply, read as Dask's framing
            raise InputError(f"Dask scheduler {scheduler}", f"answered, but not as a Dask scheduler "
                             f"({type(exc).__name__})", "Check the address and port: dask-scheduler prints "
                             "them (tcp://HOST:8786 by default)") from None
        try:
            yield client
        finally:
            client.close()
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@dataclass
class ChunkOutcome:
    """What one task did: ``skipped`` when its file was already there (a task run again after its
    worker died, having finished before: the scheduler re-runs tasks whose results it lost)."""

    name: str
    path: str
    skipped: bool
    valid: int
    seconds: float


@dataclass
class DistributedResult:
    """A distributed run: the assembled output and what happened to the chunks."""

    path: Path
    grid: Grid
    chunks: int
    done: int      # chunks this run submitted
    skipped: int   # chunks already finished by an earlier run (resume), not submitted
    seconds: float
    folder: Optional[Path]
    outcomes: list = field(default_factory=list)


def run_chunk_tasks(client: Any, task: Callable[..., ChunkOutcome], jobs: Sequence[dict],
                    retries: int = DEFAULT_RETRIES, progress: Optional[Callable[[int, int], None]] = None,
                    ) -> list[ChunkOutcome]:
    """Submit one task per job, wait for all; a chunk still failing after its retries is one InputError.

    A worker that dies takes its task with it; the scheduler re-runs it on another worker
    (up to ``distributed.scheduler.allowed-failures`` times) before giving up with
    KilledWorker, which is reported like any other failure, by the chunk's name.
    """
    from distributed import as_completed

    stamp = f"{os.getpid()}-{time.time_ns()}"
    futures = {client.submit(task, **job, key=f"{job['name']}-{stamp}", retries=retries, pure=False): job["name"]
               for job in jobs}
    outcomes: list[ChunkOutcome] = []
    if not jobs:
        return outcomes
    failures: list[tuple[str, BaseException]] = []
    for future in as_completed(futures):
        try:
            outcomes.append(future.result())
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the chunk
            failures.append((futures[future], exc))
        if progress:
            progress(len(outcomes) + len(failures), len(futures))
    if failures:
        name, exc = sorted(failures, key=lambda f: f[0])[0]
        others = f" ({len(failures) - 1} other chunk(s) failed too)" if len(failures) > 1 else ""
        if isinstance(exc, InputError):
            raise InputError(f"{exc.subject} ({name})", exc.problem + others, exc.fix) from None
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise InputError(name, f"failed after {retries + 1} tries ({reason}){others}",
                         "Run the same command again: finished chunks are kept and only the failed ones run")
    return sorted(outcomes, key=lambda o: o.name)


# ---------------------------------------------------------------- tasks (run on workers)

_RUNNERS: dict = {}


def _runner(model: str, backend: str, device: str, amp: bool, uncertainty: bool = False) -> tuple[Any, Any]:
    """The model and its runner, loaded once per worker process (not once per chunk).

    Keyed by the folder's modification time too: a long-lived worker must not keep a model
    that was trained again into the same folder (its files are renamed into place). With
    ``uncertainty`` the package is the one ``predict_uncertainty`` runs (the TTA spread).
    """
    key = (model, Path(model).stat().st_mtime_ns, backend, device, amp, uncertainty)
    if key not in _RUNNERS:
        from .inference import make_runner
        from .models import open_package
        from .uncertainty import uncertainty_package

        package = open_package(model)
        if uncertainty:
            package = uncertainty_package(package)
        _RUNNERS.clear()  # one model at a time per worker: they are large
        _RUNNERS[key] = package, make_runner(package, backend, device, amp)
    return _RUNNERS[key]


def _blend_tiles(source: EmbeddingRaster, runner: Any, chunk: Chunk, th: int, tw: int, overlap: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heights and validity over ``chunk.outer``, accumulated as ``predict_height`` does.

    Tiles row by row, each row's columns in batches, weights from ``blend_weights``: the
    same sums in the same order as the whole raster's run for every pixel of the interior.
    """
    from .inference import blend_weights

    weights = blend_weights(th, tw, overlap)
    r_off, c_off = int(chunk.outer.row_off), int(chunk.outer.col_off)
    shape = (int(chunk.outer.height), int(chunk.outer.width))
    num, den = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    for r in chunk.rows:
        for first in range(0, len(chunk.cols), batch_size):
            cols = chunk.cols[first:first + batch_size]
            stack = np.empty((len(cols), aef.N_BANDS, th, tw), dtype=np.float32)
            masks = [source.read_model_input(Window(c, r, tw, th), stack[j]) for j, c in enumerate(cols)]
            live = [i for i, m in enumerate(masks) if m.any()]  # all-nodata tiles: no model run, as there
            if live:
                for i, h in zip(live, runner(stack if len(live) == len(cols) else stack[live])):
                    sl = np.s_[r - r_off:r - r_off + th, cols[i] - c_off:cols[i] - c_off + tw]
                    num[sl] += h * weights
                    den[sl] += weights
            for c, m in zip(cols, masks):
                valid[r - r_off:r - r_off + th, c - c_off:c - c_off + tw] |= m
    return num, den, valid


def predict_chunk(name: str, embeddings: str, model: str, out: str, inner: tuple[int, int, int, int],
                  outer: tuple[int, int, int, int], rows: Sequence[int], cols: Sequence[int], th: int, tw: int,
                  overlap: int, batch_size: int = 4, device: str = "auto", amp: bool = True,
                  backend: str = "auto", terrain: Optional[str] = None, uncertainty: bool = False) -> ChunkOutcome:
    """One chunk: the whole raster's tiles ``rows`` x ``cols`` blended, ``inner`` written to ``out``.

    Windows are (col, row, width, height) in the whole raster's pixels. Skips the work
    when ``out`` exists (a finished chunk of an earlier run, or of an earlier try). With
    ``terrain`` (a file; the model predicts relief) the terrain is added to the interior.
    With ``uncertainty`` the values are the TTA spread, described as ``predict_uncertainty``
    describes its file.
    """
    from .rasters import describe_band
    from .uncertainty import DESCRIPTION, uncertainty_tags

    started = time.perf_counter()
    out_path = Path(out)
    if out_path.exists():
        return ChunkOutcome(name, out, True, -1, 0.0)
    package, runner = _runner(model, backend, device, amp, uncertainty)
    chunk = Chunk(0, 0, Window(*inner), Window(*outer), tuple(rows), tuple(cols))
    with EmbeddingRaster(embeddings) as source:
        whole = source.grid
        num, den, valid = _blend_tiles(source, runner, chunk, th, tw, overlap, batch_size)
    a, b = int(inner[1] - outer[1]), int(inner[0] - outer[0])
    sl = np.s_[a:a + int(inner[3]), b:b + int(inner[2])]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = (num[sl] / den[sl]).astype(np.float32)
    values = np.where(valid[sl], ratio, np.float32(OUTPUT_NODATA)).astype(np.float32)
    bad = int(np.count_nonzero(valid[sl] & ~np.isfinite(ratio)))
    if bad:
        raise InputError(package.path, f"gave {bad} non-finite height(s) for valid embeddings",
                         "Run in full precision (--no-amp) or check the model's weights")
    tags = {}
    if terrain:
        values = _plus_terrain(values, valid[sl], terrain, whole, chunk.inner)
        tags = terrain_tags(terrain)
    grid = sub_grid(whole, chunk.inner)
    with atomic_write(out_path) as tmp:
        with rasterio.open(tmp, "w", **float_profile(grid)) as dst:
            describe_band(dst, DESCRIPTION if uncertainty else "predicted surface height", "m", MODEL=package.name,
                          SOURCE_EMBEDDINGS=Path(embeddings).name, TILE=str(max(th, tw)), OVERLAP=str(overlap),
                          **tags)
            if uncertainty:  # on the band, as predict_height writes band_tags
                dst.update_tags(1, **uncertainty_tags(package))
            dst.write(values, 1)
    return ChunkOutcome(name, out, False, int(valid[sl].sum()), time.perf_counter() - started)


def _plus_terrain(relief: np.ndarray, valid: np.ndarray, terrain: str, whole: Grid, inner: Window) -> np.ndarray:
    """``relief`` plus the terrain over ``inner``; nodata where either has none.

    The terrain is warped onto the whole raster's grid and read over the window, not warped
    onto the chunk's own grid: GDAL warps a warped VRT block by block on its own block
    lattice, so this reads the same values as ``predict_surface`` on one process.
    """
    with ReferenceOnGrid(terrain, whole) as ground:
        total = relief + ground.read(inner)
    return np.where(valid & np.isfinite(total), total, np.float32(OUTPUT_NODATA)).astype(np.float32)


def fetch_chunk(name: str, out: str, grid: dict, year: int, source: str, cache_dir: Optional[str],
                source_options: dict) -> ChunkOutcome:
    """One chunk of a fetch: the embeddings of ``grid`` (its own GeoTIFF), through the usual fetch."""
    started = time.perf_counter()
    if Path(out).exists():
        return ChunkOutcome(name, out, True, -1, 0.0)
    from .aoi import AreaOfInterest
    from .fetch import fetch

    g = Grid(rasterio.crs.CRS.from_wkt(grid["crs"]), Affine(*grid["transform"]), grid["width"], grid["height"])
    aoi = AreaOfInterest(*g.bounds, crs=g.crs.to_string())
    result = fetch(aoi, year, source, out, grid=g, cache_dir=cache_dir, **source_options)
    return ChunkOutcome(name, out, False, int(round(result.valid_fraction * g.width * g.height)),
                        time.perf_counter() - started)


# ---------------------------------------------------------------- outputs

def chunk_folder(out: str | os.PathLike) -> Path:
    """Where the chunk GeoTIFFs of ``out`` go: ``<out>.chunks/`` beside it (found again on resume)."""
    out = Path(out)
    return out.with_name(out.name + CHUNKS_SUFFIX)


def check_distributed_output(out: str | os.PathLike, cog: bool) -> Path:
    """``.vrt``: a VRT over the kept chunk files; ``.tif``/``.tiff``: one GeoTIFF (COG with ``cog``)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".vrt", ".tif", ".tiff"):
        raise InputError(out, "is neither a .vrt nor a .tif output",
                         "Give --out NAME.vrt (a VRT over the chunk files) or NAME.tif (one GeoTIFF)")
    if cog and suffix == ".vrt":
        raise InputError(out, "is a VRT, which --cog does not apply to",
                         "Give --out NAME.tif with --cog for one Cloud-Optimized GeoTIFF")
    return out


def _copy_metadata(first: str, ds: Any) -> None:
    """The first chunk's tags and band descriptions (source, attribution, model) onto the assembly.

    BuildVRT keeps neither; per-chunk statistics would be wrong for the whole, so they are dropped.
    """
    from osgeo import gdal

    keep = lambda md: {k: v for k, v in (md or {}).items()  # noqa: E731
                       if not k.startswith("STATISTICS_") and k != "VALID_PIXELS"}
    src = gdal.Open(first)
    ds.SetMetadata(keep(src.GetMetadata()))
    for b in range(1, min(src.RasterCount, ds.RasterCount) + 1):
        band, src_band = ds.GetRasterBand(b), src.GetRasterBand(b)
        band.SetDescription(src_band.GetDescription())
        band.SetMetadata(keep(src_band.GetMetadata()))
        if src_band.GetUnitType():
            band.SetUnitType(src_band.GetUnitType())
        if src_band.GetMetadataItem("PIXELTYPE", "IMAGE_STRUCTURE") == "SIGNEDBYTE":  # AEF int8 on GDAL < 3.7
            band.SetMetadataItem("PIXELTYPE", "SIGNEDBYTE", "IMAGE_STRUCTURE")


def assemble(paths: Sequence[str | os.PathLike], out: str | os.PathLike, cog: bool = False,
             nodata: Optional[float] = OUTPUT_NODATA, block: int = 512) -> Path:
    """A VRT over ``paths`` at ``out`` (.vrt), or one GeoTIFF/COG made from it (.tif), atomically.

    The COG has ``block`` px blocks and overviews (average) down to one block.
    """
    from osgeo import gdal

    gdal.UseExceptions()
    out = Path(out)
    tmp_vrt = out.with_name(f".{out.stem}.{os.getpid()}.assemble.vrt")
    try:
        options = gdal.BuildVRTOptions(srcNodata=nodata, VRTNodata=nodata) if nodata is not None else None
        ds = gdal.BuildVRT(str(tmp_vrt), [str(p) for p in paths], options=options)
        if ds is None:
            raise InputError(out, "could not be assembled from the chunk files (GDAL BuildVRT failed)",
                             "Check the chunk files beside it, or delete them and run again")
        _copy_metadata(str(paths[0]), ds)
        ds = None
        if out.suffix.lower() == ".vrt":
            os.replace(tmp_vrt, out)
            return out
        with atomic_write(out) as tmp:
            if cog:
                creation = ["COMPRESS=DEFLATE", "PREDICTOR=YES", f"BLOCKSIZE={block}", "OVERVIEWS=AUTO",
                            "RESAMPLING=AVERAGE", "BIGTIFF=IF_SAFER", "NUM_THREADS=ALL_CPUS"]
                ds = gdal.Translate(tmp, str(tmp_vrt), format="COG", creationOptions=creation)
            else:
                creation = ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER",
                            "NUM_THREADS=ALL_CPUS"]
                vrt = gdal.Open(str(tmp_vrt))  # held: a band outliving its dataset crashes GDAL's bindings
                if vrt.GetRasterBand(1).GetMetadataItem("PIXELTYPE", "IMAGE_STRUCTURE"):
                    creation.append("PIXELTYPE=SIGNEDBYTE")
                vrt = None
                ds = gdal.Translate(tmp, str(tmp_vrt), format="GTiff", creationOptions=creation)
            ds = None
        return out
    finally:
        tmp_vrt.unlink(missing_ok=True)


def _finish(chunk_paths: list[Path], out: Path, folder: Path, cog: bool, nodata: Optional[float]) -> None:
    assemble(chunk_paths, out, cog=cog, nodata=nodata)
    if out.suffix.lower() != ".vrt":
        shutil.rmtree(folder, ignore_errors=True)  # one file asked for: the chunks have served


MANIFEST = "run.json"


def _stamp(path: str | os.PathLike) -> dict:
    """A file's identity for resume: absolute path, size and modification time."""
    p = Path(path).absolute()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def claim_folder(folder: Path, run: dict) -> None:
    """Create the chunk folder, or check that its chunks are of this very run before resuming.

    Chunks of another input, model or chunking would otherwise be assembled silently
    into a wrong result; ``run`` (JSON-safe) is written beside them and compared.
    """
    import json

    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            earlier = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if earlier != json.loads(json.dumps(run)):
            raise InputError(folder, "holds chunks of another run (other inputs, model, tiling or chunk size)",
                             "Delete that folder, or give another --out")
        return
    if folder.exists() and any(folder.glob("chunk-*.tif")):
        raise InputError(folder, "holds chunk files of an unknown run", "Delete that folder, or give another --out")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(manifest) as tmp:
        Path(tmp).write_text(json.dumps(run, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- entry points

def predict_distributed(embeddings: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
                        client: Any, chunk_size: int = DEFAULT_CHUNK, cog: bool = False,
                        tile: Optional[int] = None, overlap: Optional[int] = None, batch_size: int = 4,
                        device: str = "auto", amp: bool = True, backend: str = "auto",
                        max_mpx: Optional[float] = None, retries: int = DEFAULT_RETRIES,
                        progress: Optional[Callable[[int, int], None]] = None,
                        task: Callable[..., ChunkOutcome] = predict_chunk,
                        terrain: Optional[str | os.PathLike] = None,
                        cache_dir: Optional[str | os.PathLike] = None,
                        uncertainty: bool = False) -> DistributedResult:
    """``predict_surface`` over ``embeddings`` in chunks on ``client``'s cluster.

    ``embeddings``, ``model``, ``out``'s folder and ``terrain`` must be paths every worker
    sees (one machine, or a shared file system). ``terrain`` (a raster file or a DEM product
    name, fetched here into ``cache_dir``) is for models trained relative to a coarse
    terrain, and refused for others. ``task`` is the per-chunk function (tests wrap it
    to kill a worker mid-run). ``uncertainty`` writes ``predict_uncertainty``'s TTA spread
    instead of the height (torch backend, ``terrain`` not used).
    """
    from .models import open_package
    from .sizes import check_size

    started = time.perf_counter()
    out = check_distributed_output(out, cog)
    package = open_package(model)
    if uncertainty:  # the spread of the relief is the spread of the height, as on one process
        from .uncertainty import BACKEND

        terrain, backend = None, BACKEND
    elif not needs_terrain(package, terrain):  # refuses a missing terrain as one process does
        terrain = None
    tile = int(tile or package.default("tile", 256))
    overlap = int(package.default("overlap", tile // 4) if overlap is None else overlap)
    if tile < package.multiple or tile % package.multiple or not 0 <= overlap <= tile // 2 or batch_size < 1:
        raise InputError(f"tile {tile}, overlap {overlap}, batch size {batch_size}",
                         f"are not a multiple of {package.multiple}, an overlap up to half the tile and a "
                         "batch of 1 or more", "Leave --tile and --overlap to the model card's defaults")
    with EmbeddingRaster(embeddings) as raster:
        grid = raster.grid
    check_size(embeddings, grid.width, grid.height, max_mpx, resolution_m=grid.resolution[0],
               allow="Add --yes to run it anyway (or raise --max-mpx)")
    terrain_file = _terrain_file(terrain, embeddings, out, grid, cache_dir) if terrain else None
    layout = Layout.of(grid.width, grid.height, tile, overlap, package.multiple)
    chunks = plan_chunks(grid.width, grid.height, chunk_size, layout)
    folder = chunk_folder(out)
    model_files = sorted(p for p in Path(model).iterdir() if p.is_file())
    run = {"command": "predict", "embeddings": _stamp(embeddings), "model": [_stamp(p) for p in model_files],
           "tile": tile, "overlap": overlap, "chunk_size": chunk_size, "backend": backend, "device": device,
           "amp": amp}
    if terrain_file:  # only then: folders of earlier runs without a terrain still resume
        run["terrain"] = _stamp(terrain_file)
    if uncertainty:  # likewise; never the chunks of a run of heights
        run["uncertainty"] = True
    claim_folder(folder, run)
    window = lambda w: (int(w.col_off), int(w.row_off), int(w.width), int(w.height))  # noqa: E731
    jobs = [dict(name=c.name, embeddings=str(Path(embeddings).absolute()), model=str(Path(model).absolute()),
                 out=str((folder / f"{c.name}.tif").absolute()), inner=window(c.inner), outer=window(c.outer),
                 rows=list(c.rows), cols=list(c.cols), th=layout.th, tw=layout.tw, overlap=overlap,
                 batch_size=batch_size, device=device, amp=amp, backend=backend,
                 terrain=str(terrain_file) if terrain_file else None, uncertainty=uncertainty) for c in chunks]
    finished = [job for job in jobs if Path(job["out"]).exists()]  # resume: written whole by an earlier run
    outcomes = run_chunk_tasks(client, task, [job for job in jobs if job not in finished], retries, progress)
    if not finished and not any(o.valid for o in outcomes):
        raise InputError(embeddings, f"has no valid pixel in its {grid.width} x {grid.height} px",
                         "Give embeddings with data over the area (AEF marks missing pixels -128)")
    _finish([Path(job["out"]) for job in jobs], out, folder, cog, OUTPUT_NODATA)
    skipped = len(finished)
    return DistributedResult(out, grid, len(chunks), len(chunks) - skipped, skipped,
                             time.perf_counter() - started, folder if out.suffix.lower() == ".vrt" else None,
                             outcomes)


def _terrain_file(terrain: str | os.PathLike, embeddings: str | os.PathLike, out: Path, grid: Grid,
                  cache_dir: Optional[str | os.PathLike]) -> Path:
    """The terrain as one absolute file every chunk reads, checked here once (bands, CRS, overlap)
    so a bad terrain is one line before any task, not a failure in every chunk."""
    from .dem import is_product
    from .rasters import check_output_path

    check_output_path(out, embeddings, *([] if is_product(terrain) else [terrain]))
    path = Path(terrain_on_embeddings_grid(terrain, embeddings, cache_dir=cache_dir)).absolute()
    with ReferenceOnGrid(path, grid):
        pass
    return path


def fetch_distributed(aoi: Any, year: int, source: str, out: str | os.PathLike, *, client: Any,
                      chunk_size: int = DEFAULT_CHUNK, cog: bool = False, cache_dir: Optional[str] = None,
                      retries: int = DEFAULT_RETRIES, progress: Optional[Callable[[int, int], None]] = None,
                      **source_options: Any) -> DistributedResult:
    """``fetch`` of a large area in chunks across the cluster's workers.

    The output grid is the one a single fetch would make; each chunk is a sub-grid of it
    fetched by the usual code (its tiles cached in ``cache_dir``: a shared folder, or each
    worker's own default cache on a cluster of machines).
    """
    from .fetch import check_year, make_source
    from .fetch.cache import resolve_cache_dir

    started = time.perf_counter()
    year = check_year(year)
    if source_options.get("raster"):  # workers may start elsewhere than this process's folder
        source_options = dict(source_options, raster=str(Path(source_options["raster"]).absolute()))
    out = check_distributed_output(out, cog)
    src = make_source(source, resolve_cache_dir(cache_dir), **source_options)
    try:
        grid = src.grid_for(aoi, None)
    finally:
        src.close()
    chunks = plan_chunks(grid.width, grid.height, chunk_size)
    folder = chunk_folder(out)
    claim_folder(folder, {"command": "fetch", "aoi": list(aoi.bounds), "aoi_crs": str(aoi.crs), "year": year,
                          "source": source, "options": {k: str(v) for k, v in source_options.items()},
                          "chunk_size": chunk_size})
    jobs = []
    for c in chunks:
        g = sub_grid(grid, c.inner)
        jobs.append(dict(name=c.name, out=str((folder / f"{c.name}.tif").absolute()),
                         grid={"crs": g.crs.to_wkt(), "transform": tuple(g.transform)[:6], "width": g.width,
                               "height": g.height},
                         year=year, source=source, cache_dir=str(cache_dir) if cache_dir else None,
                         source_options=source_options))
    finished = [job for job in jobs if Path(job["out"]).exists()]  # resume: written whole by an earlier run
    outcomes = run_chunk_tasks(client, fetch_chunk, [job for job in jobs if job not in finished], retries, progress)
    from . import aef

    _finish([Path(j["out"]) for j in jobs], out, folder, cog, aef.NODATA_INT8)
    skipped = len(finished)
    return DistributedResult(out, grid, len(chunks), len(chunks) - skipped, skipped,
                             time.perf_counter() - started, folder if out.suffix.lower() == ".vrt" else None,
                             outcomes)
