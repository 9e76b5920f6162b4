"""Tiled, streaming height prediction over an embeddings raster of any size.

Tiles overlap and are blended with weights that fall to ~0 at tile edges, so no seam
shows. Along each axis the fewest tiles that keep the overlap are spread evenly and
shrunk to just cover the raster, so little input is computed twice. The raster is
processed in column bands of whole tiles, each top to bottom with a rolling accumulator
one tile high; the columns two bands share pass from one to the next as partial sums, so
no tile runs twice. Memory depends on tile, batch and band width (and on the height,
by about the overlap's width of sums), not on the area. Reading and
de-quantising the next batches (a reader thread) and checking and writing finished
strips (a writer thread) overlap with the model, which releases the GIL. The output
appears under its name only once complete.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import rasterio
from rasterio.windows import Window

from . import aef
from .cancel import CancelFn, Cancelled, ProgressFn
from .choices import BACKENDS, check_choice
from .device import describe_device, precision_policy, select_device
from .errors import InputError
from .models import ONNX_FILE, ModelPackage, open_package
from .rasters import (OUTPUT_NODATA, EmbeddingRaster, Grid, atomic_write, check_output_path,
                      describe_band, ensure_free_space, float_profile, raster_bytes)
from .sizes import check_size, format_bytes

DEFAULT_BAND_WIDTH = 4096
BATCH_TILE_PX = 256 * 256  # a batch holds at most batch_size tiles and batch_size x this many pixels
MIN_READ_CACHE, MAX_READ_CACHE = 64 * 2**20, 256 * 2**20
MAX_READ_THREADS = 8  # beyond that a tile's share of bands is too small to gain from another thread


def read_cache_bytes(source: EmbeddingRaster, plan: "TilePlan") -> int:
    """GDAL's block cache for a prediction: 1.5 x the blocks one tile touches, 64-256 MB.

    The cache is process-wide, 5 % of RAM by default, and kept every block read or
    written until full: peak memory grew with the area up to that size. Capped at one
    tile's blocks (64 MB for 608 px tiles on 256 px blocks), the next tile found none of
    the blocks it shares with this one (they are read band by band, the first bands
    evicted by the last), and decoding took half as long again; half a tile more keeps
    them. Decoding each block once would take a whole row of tiles' blocks (272 MB at
    4096 px): memory would grow with the band's width.
    """
    wanted = 3 * source.window_block_bytes(plan.th, plan.tw) // 2
    return min(max(wanted, MIN_READ_CACHE), MAX_READ_CACHE)


@dataclass
class PredictionResult:
    path: Path
    grid: Grid
    tiles: int
    seconds: float
    device: str
    stats: dict = field(default_factory=dict)


def tile_layout(length: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """Tile size and start offsets along one axis of ``length`` px.

    The fewest tiles of at most ``tile`` px that overlap by at least ``overlap`` cover the
    axis; the size is then shrunk to the smallest multiple of ``multiple`` that still
    covers with that many tiles, and the starts spread evenly (first flush with 0, last
    with the end). A fixed stride with a flush last tile would compute up to a whole
    tile twice at the end of every axis: with 512 px tiles on 1024 px, 3 tiles of 512
    (1.5 input px per output px) instead of 3 of 384 (1.125).
    """
    size = min(tile, _round_up(length, multiple))
    if length <= size:
        return size, [0]
    count = -(-(length - overlap) // (tile - overlap))
    size = min(tile, _round_up(-(-(length + (count - 1) * overlap) // count), multiple))
    return size, [i * (length - size) // (count - 1) for i in range(count)]


def blend_weights(rows: int, cols: int, overlap: int) -> np.ndarray:
    """2-D weights: 1 in the tile core, ramping towards ~0 across the overlap at each edge."""
    def ramp(n: int) -> np.ndarray:
        if overlap <= 0:
            return np.ones(n, dtype=np.float32)
        i = np.arange(n, dtype=np.float32)
        return np.clip(np.minimum(i + 1, n - i) / (overlap + 1), 1e-3, 1.0)
    return np.outer(ramp(rows), ramp(cols)).astype(np.float32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class TorchRunner:
    """Holds the torch model on its device and turns batches of finite embeddings into heights.

    Missing pixels are zeroed by the reader (``EmbeddingRaster.read_model_input``, on
    every core), not here.
    """

    def __init__(self, package: ModelPackage, device_name: str, amp: bool, channels_last: Optional[bool]) -> None:
        import torch

        self.torch = torch
        self.device = select_device(device_name)
        self.description = describe_device(self.device)
        self.amp_dtype, default_layout = precision_policy(self.device, amp)
        self.amp = self.amp_dtype is not None
        self.channels_last = default_layout if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module = package.torch_module().to(self.device, memory_format=memory_format).eval()
        self.mean, self.std = package.target_mean, package.target_std

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            y = self.module(x)[:, 0].float()
        return (y * self.std + self.mean).cpu().numpy()


class OnnxRunner:
    """The package's ONNX graph on ONNX Runtime's CPU provider: no torch, a few tens of MB.

    Takes batches of finite embeddings, like ``TorchRunner``.
    """

    def __init__(self, package: ModelPackage) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        # Spinning threads would keep the cores busy between batches, while this process
        # reads, de-quantises and blends the next tiles on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(package.onnx_path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.mean, self.std = package.target_mean, package.target_std
        threads = options.intra_op_num_threads or os.cpu_count() or 1
        self.description = f"cpu (ONNX Runtime {ort.__version__}, {threads} threads)"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        y = self.session.run(None, {self.input: x})[0][:, 0]
        return y * np.float32(self.std) + np.float32(self.mean)


ModelRunner = Union[TorchRunner, OnnxRunner]


def resolve_backend(package: ModelPackage, backend: str = "auto", device: str = "auto") -> str:
    """``onnx`` or ``torch`` for this package and device.

    auto: ONNX Runtime on the CPU when the package has a graph and onnxruntime is
    installed, unless a GPU is asked for or (device auto) PyTorch sees one.
    """
    backend, device = (backend or "auto").lower(), (device or "auto").lower()
    check_choice(backend, BACKENDS, "backend")
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if backend == "onnx":
        if package.onnx_path is None:
            raise InputError(package.path, f"has no {ONNX_FILE} graph for the ONNX backend",
                             "Add one with: alphaearth-height export-onnx --model FOLDER, or use --backend torch")
        if not have_ort:
            raise InputError("backend 'onnx'", "needs the onnxruntime package, which is not installed",
                             "pip install onnxruntime, or use --backend torch")
        if device not in ("auto", "cpu"):
            raise InputError(f"device '{device}'", "is not available with the ONNX backend (CPU only)",
                             "Use --backend torch for a GPU, or --device cpu")
        return "onnx"
    if backend == "torch" or package.onnx_path is None or not have_ort or device not in ("auto", "cpu"):
        return _torch_available(package, backend, device)
    if device == "cpu" or importlib.util.find_spec("torch") is None:
        return "onnx"
    return "torch" if _torch_sees_gpu() else "onnx"


def _torch_available(package: ModelPackage, backend: str, device: str) -> str:
    """'torch', or a one-line error when this Python has no PyTorch (the plugin's lean environment)."""
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    if device not in ("auto", "cpu"):
        reason = f"device '{device}'"
    elif backend == "torch":
        reason = "backend 'torch'"
    else:
        reason = f"{package.path} (no {ONNX_FILE} graph)"
    raise InputError(reason, "needs PyTorch, which this Python environment does not have",
                     "Install it (the dock's 'Add training (PyTorch)', or pip install torch), "
                     "or use the CPU with a model folder that has model.onnx")


def _torch_sees_gpu() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def make_runner(package: ModelPackage, backend: str = "auto", device: str = "auto", amp: bool = True,
                channels_last: Optional[bool] = None) -> ModelRunner:
    """The runner for a package: ONNX Runtime or torch, as ``resolve_backend`` decides."""
    if resolve_backend(package, backend, device) == "onnx":
        return OnnxRunner(package)
    return TorchRunner(package, device, amp, channels_last)


def terrain_not_given(package: ModelPackage) -> InputError:
    """The one line for a model trained on height above a coarse terrain that was given none."""
    trained_on = package.card["target"]["relative_to"].get("product")
    return InputError(package.path, "predicts height above a coarse terrain raster, which this prediction "
                      "was not given", (f"Give it the terrain it was trained with: --terrain {trained_on} "
                                        "(or the dock's or Processing's 'Coarse terrain' choice)") if trained_on
                      else "Give it the terrain raster (predict --terrain, or the dock's or "
                      "Processing's 'Coarse terrain' input)")


def _check_tiling(tile: int, overlap: int, batch_size: int, multiple: int) -> None:
    if tile < multiple or tile % multiple:
        raise InputError(f"tile size {tile}", f"is not a positive multiple of {multiple}, which this model needs",
                         f"Use a tile size such as {max(multiple, _round_up(tile, multiple))}")
    if not 0 <= overlap <= tile // 2:
        raise InputError(f"overlap {overlap}", f"must be between 0 and half the tile ({tile // 2})",
                         "Use a smaller overlap, e.g. a quarter of the tile")
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}", "must be at least 1", "Use --batch-size 1 or more")


def predict_height(embeddings: str | os.PathLike, model: str | os.PathLike | ModelPackage,
                   out_path: str | os.PathLike, *, tile: Optional[int] = None, overlap: Optional[int] = None,
                   batch_size: int = 4, device: str = "auto", amp: bool = True,
                   channels_last: Optional[bool] = None, band_width: int = DEFAULT_BAND_WIDTH,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                   relative: bool = False, backend: str = "auto", max_mpx: Optional[float] = None,
                   too_large_fix: str = "Clip the embeddings to a smaller area first",
                   description: str = "predicted surface height", band_tags: Optional[dict] = None) -> PredictionResult:
    """Predict surface height (m) for every pixel of an embeddings raster into a GeoTIFF.

    A model trained on height above a coarse terrain raster is refused unless ``relative``
    (set by ``core.terrain``, which adds the terrain back). Rasters above ``max_mpx``
    megapixels are refused before any work (``too_large_fix`` says how to allow them);
    so is a raster with no valid pixel (tiles without one are never run through the model).
    ``batch_size`` tiles go to the model at once, fewer when tiles are larger than 256 px
    (``TilePlan.tiles_per_batch``), so memory does not grow with the tile size.
    """
    started = time.perf_counter()
    package = model if isinstance(model, ModelPackage) else open_package(model)
    if package.card["target"].get("relative_to") and not relative:
        raise terrain_not_given(package)
    tile = int(tile or package.default("tile", 256))
    overlap = int(package.default("overlap", tile // 4) if overlap is None else overlap)
    _check_tiling(tile, overlap, batch_size, package.multiple)
    out = check_output_path(out_path, embeddings)
    with EmbeddingRaster(embeddings) as source:
        grid = source.grid
        plan = TilePlan(grid, tile, overlap, package.multiple, max(band_width, tile))
        check_size(embeddings, grid.width, grid.height, max_mpx, resolution_m=grid.resolution[0],
                   details=f", about {plan.total_tiles:,} tiles and "
                           f"{format_bytes(4 * grid.width * grid.height)} of heights to write",
                   allow=too_large_fix)
        ensure_free_space(out, raster_bytes(grid.width, grid.height), "the prediction")
        on_cpu = _runs_on_cpu(package, backend, device)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-model-load") as loader, \
                rasterio.Env(GDAL_CACHEMAX=read_cache_bytes(source, plan)), TileReader(source) as reader, \
                closing(_batches_for(on_cpu, reader, plan, batch_size)) as batches:
            loading = loader.submit(make_runner, package, backend, device, amp, channels_last)
            first = next(batches, None)  # read while the model loads
            runner = loading.result()
            stats = _Stats()
            with atomic_write(out) as tmp:
                with rasterio.open(tmp, "w", **float_profile(grid), num_threads="ALL_CPUS") as dst:
                    describe_band(dst, description, "m", MODEL=package.name,
                                  SOURCE_EMBEDDINGS=Path(embeddings).name, TILE=str(tile), OVERLAP=str(overlap))
                    strips = _predict_strips(itertools.chain([] if first is None else [first], batches), runner, plan,
                                             cancel)
                    _write_strips(dst, strips, stats, package.path, plan.total_tiles, progress)
                    if not stats.n:
                        raise InputError(embeddings, f"has no valid pixel in its {grid.width} x {grid.height} px "
                                         "(every pixel is nodata, NaN or infinite)",
                                         "Give embeddings with data over the area (AEF marks missing pixels -128), "
                                         "or fetch the area again")
                    dst.update_tags(1, **stats.tags(), **(band_tags or {}))
    return PredictionResult(out, grid, plan.total_tiles, time.perf_counter() - started,
                            runner.description, stats.summary())


def _write_strips(dst: rasterio.io.DatasetWriter, strips: Iterator[tuple[Window, np.ndarray, int]],
                  stats: "_Stats", model_path: Path, total_tiles: int, progress: Optional[ProgressFn]) -> None:
    """Write strips as the model finishes them. One writer thread: statistics, the
    non-finite check and the (compressing) write of a strip overlap with the model's next
    batches; at most one strip is in flight."""
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-writer") as writer:
        pending: Optional[Future] = None
        try:
            for window, values, n_tiles in strips:
                if pending is not None:
                    pending.result()
                pending = writer.submit(_check_and_write, dst, stats, window, values, model_path)
                done += n_tiles
                if progress:
                    progress(done, total_tiles)
            if pending is not None:
                pending.result()
        finally:  # stops the model's loop (and with it the reader) on cancel or error
            strips.close()


def _check_and_write(dst: rasterio.io.DatasetWriter, stats: "_Stats", window: Window, values: np.ndarray,
                     model_path: Path) -> None:
    """Count a finished strip into the statistics, refuse non-finite heights, write it."""
    stats.add(values)
    if stats.non_finite:
        raise InputError(model_path, f"gave {stats.non_finite} non-finite height(s) for valid embeddings (in the "
                         f"window at column {window.col_off}, row {window.row_off})",
                         "Run in full precision (--no-amp, or untick 'Mixed precision') or check the model's weights")
    dst.write(values, 1, window=window)
    _trim_heap()


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc), once per strip written.

    Strips, accumulator copies and the model's intermediate arrays are freed every batch,
    but glibc keeps the freed pages of its per-thread heaps: without this, peak memory
    crept up over a long run (about +150 MB at 4096 x 4096 px) instead of staying flat.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Band(NamedTuple):
    """A column band: the tile columns it runs and the output columns [c0, c1) it writes."""

    c0: int
    c1: int
    cols: list[int]


@dataclass
class TilePlan:
    """Tile geometry: tile height/width (see ``tile_layout``), start offsets, weights and bands."""

    grid: Grid
    tile: int
    overlap: int
    multiple: int
    band_width: int

    def __post_init__(self) -> None:
        self.th, self.rows = tile_layout(self.grid.height, self.tile, self.overlap, self.multiple)
        self.tw, self.cols = tile_layout(self.grid.width, self.tile, self.overlap, self.multiple)
        self.weights = blend_weights(self.th, self.tw, self.overlap)
        self.total_tiles = len(self.rows) * len(self.cols)
        self._bands = self._group_bands()

    @property
    def input_per_output(self) -> float:
        """Input pixels the model computes per output pixel (every tile runs once)."""
        return self.total_tiles * self.th * self.tw / (self.grid.width * self.grid.height)

    def _group_bands(self) -> list[Band]:
        """Consecutive tile columns spanning at most ``band_width`` px (two at least), each
        tile in one band only. A band writes from its first tile's start to the next
        band's first tile's start; the columns its last tile shares with the next band
        are handed over as partial sums (``_Carry``), so no tile runs twice."""
        groups, first = [], 0
        for i, c in enumerate(self.cols):
            if i > first + 1 and c + self.tw - self.cols[first] > self.band_width:
                groups.append(self.cols[first:i])
                first = i
        groups.append(self.cols[first:])
        return [Band(0 if g == 0 else cols[0], groups[g + 1][0] if g + 1 < len(groups) else self.grid.width, cols)
                for g, cols in enumerate(groups)]

    def bands(self) -> list[Band]:
        return self._bands

    def tiles_per_batch(self, batch_size: int) -> int:
        """``batch_size`` tiles, fewer when tiles are larger than 256 x 256 px (one 512 px tile for 4).

        A batch's input, the model's activations and the batches in flight scale with its
        pixels: counting them keeps memory per batch that of ``batch_size`` 256 px tiles
        whatever the tile size, and the CPU runs as fast with 1 x 512² as with 4 x 256².
        """
        return max(1, min(batch_size, batch_size * BATCH_TILE_PX // (self.th * self.tw)))

    def batches(self, batch_size: int) -> Iterator[tuple[int, int, int, list[int]]]:
        """(band, row index, row offset, column offsets) of every batch, in prediction order."""
        batch_size = self.tiles_per_batch(batch_size)
        for b, band in enumerate(self.bands()):
            for k, r in enumerate(self.rows):
                for first in range(0, len(band.cols), batch_size):
                    yield b, k, r, band.cols[first:first + batch_size]


class _Batch(NamedTuple):
    """One batch as the reader thread prepared it: de-quantised tiles and validity masks."""

    band: int
    row: int
    r: int
    cols: list[int]
    masks: list[np.ndarray]
    live: list[int]            # indices into cols of tiles with at least one valid pixel
    stack: Optional[np.ndarray]  # those tiles, (n, 64, th, tw), NaN-free; None if none is live


class TileReader:
    """Model input read on every core at once: each thread reads its share of the 64
    bands of a tile on its own handle of the file (GDAL handles are not shared between
    threads), so a tile takes half the time on 2 cores, a quarter on 4.

    Only windows ``EmbeddingRaster.reads_directly`` (AEF int8, inside the raster), the
    tiles of any prediction but the smallest; others are read whole on the calling thread.
    """

    def __init__(self, source: EmbeddingRaster, threads: Optional[int] = None) -> None:
        self.source = source
        threads = max(1, min(threads or os.cpu_count() or 1, MAX_READ_THREADS))
        edges = np.linspace(0, aef.N_BANDS, threads + 1).astype(int)
        self._shares = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._handles = [source]
        self._pool: Optional[ThreadPoolExecutor] = None
        try:
            self._handles += [EmbeddingRaster(source.path) for _ in range(threads - 1)]
        except BaseException:
            self.close()
            raise
        if threads > 1:
            self._pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="predict-reader")

    def read_model_input(self, window: Window, out: np.ndarray) -> np.ndarray:
        """``EmbeddingRaster.read_model_input`` of the whole window, shared out over the threads."""
        if self._pool is None or not self.source.reads_directly(window):
            return self.source.read_model_input(window, out)
        others = [self._pool.submit(handle.read_model_input, window, out[share], share)
                  for handle, share in zip(self._handles[1:], self._shares[1:])]
        mask = self.source.read_model_input(window, out[self._shares[0]], self._shares[0])
        for other in others:
            mask &= other.result()
        return mask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for handle in self._handles[1:]:
            handle.close()

    def __enter__(self) -> "TileReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs_on_cpu(package: ModelPackage, backend: str, device: str) -> bool:
    """Whether ``make_runner`` will run the model on the CPU (the same choices, made before it loads)."""
    if resolve_backend(package, backend, device) == "onnx":
        return True
    return select_device(device).type == "cpu"


def _batches_for(on_cpu: bool, reader: TileReader, plan: TilePlan, batch_size: int) -> Iterator[_Batch]:
    """The batches for a model on the CPU, read between its forward passes; for one on a GPU,
    read ahead of them.

    On the CPU the model keeps every core busy: a reader running beside it took its time
    from the model's threads (whose parallel steps then wait for the slowest), so reading
    each batch on all cores in turn costs half as much on 2 cores. A GPU leaves the cores
    free while it runs: there the next batch is read during the forward pass.
    """
    if on_cpu:
        return _read_batches(reader, plan, batch_size, buffers=1)
    return _prefetched(_read_batches(reader, plan, batch_size, buffers=2))


def _read_batches(reader: TileReader, plan: TilePlan, batch_size: int, buffers: int = 1) -> Iterator[_Batch]:
    """Read, de-quantise and mask every batch in order; the model gets finite values only.

    ``buffers`` batch arrays are filled in turn: 2 when ``_prefetched`` keeps one batch
    ahead (the consumer is done with a batch when it asks for the one after next), 1
    otherwise. Refilling memory already touched spares the page faults of a fresh
    50-300 MB array every batch.
    """
    arrays = [np.empty((plan.tiles_per_batch(batch_size), aef.N_BANDS, plan.th, plan.tw), dtype=np.float32)
              for _ in range(buffers)]
    for i, (band, k, r, cols) in enumerate(plan.batches(batch_size)):
        stack = arrays[i % buffers][:len(cols)]
        masks = [reader.read_model_input(Window(c, r, plan.tw, plan.th), stack[j]) for j, c in enumerate(cols)]
        live = [i for i, mask in enumerate(masks) if mask.any()]  # all-nodata tiles: no model run
        if len(live) < len(cols):
            stack = stack[live] if live else None
        yield _Batch(band, k, r, cols, masks, live, stack)


def _prefetched(items: Iterator[_Batch]) -> Iterator[_Batch]:
    """Run ``items`` on a reader thread, one batch ahead of the consumer (a model on a GPU).

    Reading and de-quantising the next batch then overlaps with the forward pass (torch
    releases the GIL). The reader starts a batch only once the consumer has
    taken the previous one, so two batches at most are in memory. An error in the reader
    is raised here; when the consumer stops early (cancel, error), the reader stops
    before its next batch.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    may_read = threading.Semaphore(1)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            while True:
                while not may_read.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, done)
                handoff.put(item)  # never blocks: the consumer took the previous item
                if item is done:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            handoff.put(exc)

    reader = threading.Thread(target=work, name="predict-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            may_read.release()
            yield item
    finally:
        stop.set()
        reader.join()


def _predict_strips(batches: Iterator[_Batch], runner: ModelRunner, plan: TilePlan,
                    cancel: Optional[CancelFn]) -> Iterator[tuple[Window, np.ndarray, int]]:
    """Yield (window, heights, tiles done) strips, band by band, each band top to bottom."""
    bands = plan.bands()
    acc: Optional[_Accumulator] = None
    for batch in batches:
        if cancel and cancel():
            raise Cancelled("prediction cancelled")
        if acc is None or acc.band != batch.band:
            acc = _Accumulator(plan, batch.band, bands, acc.handover if acc is not None else None)
        heights = runner(batch.stack) if batch.stack is not None else []
        for i, h in zip(batch.live, heights):
            acc.add(batch.cols[i], h)
        for c, mask in zip(batch.cols, batch.masks):
            acc.mark_valid(c, mask)
        if batch.cols[-1] == acc.cols[-1]:  # the row of tiles is complete
            yield acc.finish_row(batch.row)


class _Carry:
    """Partial sums of the columns one band's last tile shares with the next band's first,
    kept for the raster's whole height until the next band adds them: (height x about
    the overlap) values, so bands never run a tile twice."""

    def __init__(self, height: int, c0: int, c1: int) -> None:
        self.c0, self.c1 = c0, c1
        self.num = np.zeros((height, c1 - c0), dtype=np.float32)
        self.den = np.zeros((height, c1 - c0), dtype=np.float32)
        self.valid = np.zeros((height, c1 - c0), dtype=bool)


class _Accumulator:
    """Weighted sum of heights, weights and validity for one band, one tile high, rolling down."""

    def __init__(self, plan: TilePlan, band: int, bands: list[Band], carried: Optional[_Carry]) -> None:
        self.plan, self.band, self.carried = plan, band, carried
        self.c0, self.c1, self.cols = bands[band]
        self.left = self.cols[0]
        span = self.cols[-1] + plan.tw - self.left
        self.num = np.zeros((plan.th, span), dtype=np.float32)
        self.den = np.zeros((plan.th, span), dtype=np.float32)
        self.valid = np.zeros((plan.th, span), dtype=bool)
        last = band + 1 == len(bands)
        self.handover = None if last else _Carry(plan.grid.height, self.c1, self.left + span)

    def add(self, c: int, heights: np.ndarray) -> None:
        sl = np.s_[:, c - self.left:c - self.left + self.plan.tw]
        self.num[sl] += heights * self.plan.weights
        self.den[sl] += self.plan.weights

    def mark_valid(self, c: int, mask: np.ndarray) -> None:
        self.valid[:, c - self.left:c - self.left + self.plan.tw] |= mask

    def finish_row(self, k: int) -> tuple[Window, np.ndarray, int]:
        """The rows no later tile touches, as a strip to write; the accumulator moves down past them."""
        plan, r = self.plan, self.plan.rows[k]
        next_r = plan.rows[k + 1] if k + 1 < len(plan.rows) else min(r + plan.th, plan.grid.height)
        n = next_r - r
        for carry, into_self in ((self.carried, True), (self.handover, False)):
            if carry is None:
                continue
            a, b = carry.c0 - self.left, carry.c1 - self.left
            pairs = ((self.num, carry.num), (self.den, carry.den))
            for mine, kept in pairs:
                if into_self:
                    mine[:n, a:b] += kept[r:next_r]
                else:
                    kept[r:next_r] = mine[:n, a:b]
            if into_self:
                self.valid[:n, a:b] |= carry.valid[r:next_r]
            else:
                carry.valid[r:next_r] = self.valid[:n, a:b]
        a, b = self.c0 - self.left, self.c1 - self.left
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = (self.num[:n, a:b] / self.den[:n, a:b]).astype(np.float32)
        # NaN marks a valid pixel whose height is not finite: _Stats counts it, the caller refuses
        values = np.where(self.valid[:n, a:b], np.where(np.isfinite(ratio), ratio, np.float32(np.nan)),
                          OUTPUT_NODATA).astype(np.float32)
        for buf in (self.num, self.den, self.valid):
            _shift_up(buf, n)
        return Window(self.c0, r, self.c1 - self.c0, n), values, len(self.cols)


def _shift_up(buf: np.ndarray, n: int) -> None:
    """Drop the first n finished rows of a rolling accumulator and clear the rows freed."""
    if n < len(buf):
        buf[:-n] = buf[n:].copy()
    buf[-n:] = 0


class _Stats:
    """Running min/max/mean/std of valid output, written as GDAL statistics tags."""

    def __init__(self) -> None:
        self.n, self.total, self.sq = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf
        self.non_finite = 0

    def add(self, values: np.ndarray) -> None:
        v = values[values != OUTPUT_NODATA].astype(np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            self.non_finite += int((~finite).sum())
            v = v[finite]
        if v.size:
            self.n += v.size
            self.total += v.sum()
            self.sq += (v * v).sum()
            self.lo, self.hi = min(self.lo, v.min()), max(self.hi, v.max())

    def summary(self) -> dict:
        if not self.n:
            return {"valid_pixels": 0}
        mean = self.total / self.n
        std = max(self.sq / self.n - mean * mean, 0.0) ** 0.5
        return {"valid_pixels": self.n, "min": float(self.lo), "max": float(self.hi),
                "mean": float(mean), "std": float(std)}

    def tags(self) -> dict:
        s = self.summary()
        if not self.n:
            return {}
        return {"STATISTICS_MINIMUM": f"{s['min']:.3f}", "STATISTICS_MAXIMUM": f"{s['max']:.3f}",
                "STATISTICS_MEAN": f"{s['mean']:.3f}", "STATISTICS_STDDEV": f"{s['std']:.3f}",
                "VALID_PIXELS": str(s["valid_pixels"])}
