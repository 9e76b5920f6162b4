"""Tiled, streaming height prediction over an embeddings raster of any size.

Tiles overlap and are blended with weights that fall to ~0 at tile edges, so no seam
shows. The raster is processed in column bands, each top to bottom with a rolling
accumulator one tile high: memory depends on tile, batch and band width, never on the
area. The output appears under its name only once complete.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import rasterio
from rasterio.windows import Window

from .cancel import CancelFn, Cancelled, ProgressFn
from .choices import BACKENDS, check_choice
from .device import describe_device, precision_policy, select_device
from .errors import InputError
from .models import ONNX_FILE, ModelPackage, open_package
from .rasters import (OUTPUT_NODATA, EmbeddingRaster, Grid, atomic_write, check_output_path,
                      describe_band, ensure_free_space, float_profile, raster_bytes, valid_mask)
from .sizes import check_size, format_bytes

DEFAULT_BAND_WIDTH = 4096


@dataclass
class PredictionResult:
    path: Path
    grid: Grid
    tiles: int
    seconds: float
    device: str
    stats: dict = field(default_factory=dict)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length``; the last one is flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


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
    """Holds the torch model on its device and turns batches of embeddings into heights."""

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
        x = torch.from_numpy(np.nan_to_num(batch, nan=0.0, posinf=0.0, neginf=0.0)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            y = self.module(x)[:, 0].float()
        return (y * self.std + self.mean).cpu().numpy()


class OnnxRunner:
    """The package's ONNX graph on ONNX Runtime's CPU provider: no torch, a few tens of MB."""

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
        x = np.ascontiguousarray(np.nan_to_num(batch, nan=0.0, posinf=0.0, neginf=0.0), dtype=np.float32)
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
    """
    started = time.perf_counter()
    package = model if isinstance(model, ModelPackage) else open_package(model)
    if package.card["target"].get("relative_to") and not relative:
        trained_on = package.card["target"]["relative_to"].get("product")
        raise InputError(package.path, "predicts height above a coarse terrain raster, which this prediction "
                         "was not given", (f"Give it the terrain it was trained with: --terrain {trained_on} "
                                           "(or the dock's or Processing's 'Coarse terrain' choice)") if trained_on
                         else "Give it the terrain raster (predict --terrain, or the dock's or "
                         "Processing's 'Coarse terrain' input)")
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
        runner = make_runner(package, backend, device, amp, channels_last)
        stats = _Stats()
        with atomic_write(out) as tmp:
            with rasterio.open(tmp, "w", **float_profile(grid)) as dst:
                describe_band(dst, description, "m", MODEL=package.name,
                              SOURCE_EMBEDDINGS=Path(embeddings).name, TILE=str(tile), OVERLAP=str(overlap))
                done = 0
                for c0, c1 in plan.bands():
                    for finished in _predict_band(source, runner, plan, c0, c1, batch_size, cancel):
                        window, values, n_tiles = finished
                        stats.add(values)
                        if stats.non_finite:
                            raise InputError(package.path, f"gave {stats.non_finite} non-finite height(s) for valid "
                                             f"embeddings (in the window at column {window.col_off}, row "
                                             f"{window.row_off})", "Run in full precision (--no-amp, or untick "
                                             "'Mixed precision') or check the model's weights")
                        dst.write(values, 1, window=window)
                        done += n_tiles
                        if progress:
                            progress(done, plan.total_tiles)
                if not stats.n:
                    raise InputError(embeddings, f"has no valid pixel in its {grid.width} x {grid.height} px "
                                     "(every pixel is nodata, NaN or infinite)",
                                     "Give embeddings with data over the area (AEF marks missing pixels -128), "
                                     "or fetch the area again")
                dst.update_tags(1, **stats.tags(), **(band_tags or {}))
    return PredictionResult(out, grid, plan.total_tiles, time.perf_counter() - started,
                            runner.description, stats.summary())


@dataclass
class TilePlan:
    """Tile geometry: tile height/width (shrunk for small rasters), overlaps and bands."""

    grid: Grid
    tile: int
    overlap: int
    multiple: int
    band_width: int

    def __post_init__(self) -> None:
        self.th = min(self.tile, _round_up(self.grid.height, self.multiple))
        self.tw = min(self.tile, _round_up(self.grid.width, self.multiple))
        self.rows = tile_starts(self.grid.height, self.th, max(1, self.th - self.overlap))
        self.cols = tile_starts(self.grid.width, self.tw, max(1, self.tw - self.overlap))
        self.weights = blend_weights(self.th, self.tw, self.overlap)
        self.total_tiles = sum(len(self.band_cols(c0, c1)) for c0, c1 in self.bands()) * len(self.rows)

    def bands(self) -> list[tuple[int, int]]:
        width = self.grid.width
        return [(c0, min(c0 + self.band_width, width)) for c0 in range(0, width, self.band_width)]

    def band_cols(self, c0: int, c1: int) -> list[int]:
        return [c for c in self.cols if c < c1 and c + self.tw > c0]


def _predict_band(source: EmbeddingRaster, runner: ModelRunner, plan: TilePlan, c0: int, c1: int,
                  batch_size: int, cancel: Optional[CancelFn]):
    """Yield (window, heights, tiles done) strips of the band [c0, c1), top to bottom."""
    cols = plan.band_cols(c0, c1)
    left = cols[0]
    span = cols[-1] + plan.tw - left
    num = np.zeros((plan.th, span), dtype=np.float32)
    den = np.zeros((plan.th, span), dtype=np.float32)
    valid = np.zeros((plan.th, span), dtype=bool)
    for k, r in enumerate(plan.rows):
        for first in range(0, len(cols), batch_size):
            if cancel and cancel():
                raise Cancelled("prediction cancelled")
            chunk = cols[first:first + batch_size]
            tiles = [source.read(Window(c, r, plan.tw, plan.th)) for c in chunk]
            masks = [valid_mask(emb) for emb in tiles]
            live = [i for i, mask in enumerate(masks) if mask.any()]  # all-nodata tiles: no model run
            heights = runner(np.stack([tiles[i] for i in live])) if live else []
            for i, h in zip(live, heights):
                sl = np.s_[:, chunk[i] - left:chunk[i] - left + plan.tw]
                num[sl] += h * plan.weights
                den[sl] += plan.weights
            for c, mask in zip(chunk, masks):
                valid[:, c - left:c - left + plan.tw] |= mask
        next_r = plan.rows[k + 1] if k + 1 < len(plan.rows) else min(r + plan.th, plan.grid.height)
        n = next_r - r
        a, b = c0 - left, c1 - left
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = (num[:n, a:b] / den[:n, a:b]).astype(np.float32)
        # NaN marks a valid pixel whose height is not finite: _Stats counts it, the caller refuses
        values = np.where(valid[:n, a:b], np.where(np.isfinite(ratio), ratio, np.float32(np.nan)), OUTPUT_NODATA)
        values = values.astype(np.float32)
        yield Window(c0, r, c1 - c0, n), values, len(cols)
        for buf in (num, den, valid):
            _shift_up(buf, n)


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
