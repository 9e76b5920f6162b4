"""Predicted vs reference heights: resample the reference onto the prediction grid,
write the difference raster (prediction − reference) and compute accuracy figures."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from .errors import InputError
from .metrics import binned_metrics, height_metrics, json_safe, nice_bin_edges
from .plots import render_accuracy_plots
from .rasters import (OUTPUT_NODATA, Grid, atomic_write, check_outputs, describe_band, float_profile,
                      iter_windows, open_raster, read_or_fail)

BLOCK = 1024
MAX_SAMPLES = 10_000_000
PLOT_SAMPLES = 200_000


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def reference_resampling(reference: rasterio.DatasetReader, grid: Grid) -> Resampling:
    """Average when the reference is finer than the grid (as the paper's 5 m -> 10 m), else bilinear."""
    if reference.crs is None:
        return Resampling.bilinear
    # Compare pixel areas in the grid's units via the footprint of the whole raster.
    left, bottom, right, top = transform_bounds(reference.crs, grid.crs, *reference.bounds)
    ref_px = abs((right - left) * (top - bottom)) / max(reference.width * reference.height, 1)
    grid_px = grid.resolution[0] * grid.resolution[1]
    return Resampling.average if ref_px < grid_px else Resampling.bilinear


class ReferenceOnGrid:
    """A reference DSM seen through a warp onto a target grid, read by windows (NaN = no data).

    A raster of several bands needs ``band`` (1-based): silently taking band 1 of, say,
    the 64-band embeddings would compare heights with an embedding component.
    """

    def __init__(self, path: str | os.PathLike, grid: Grid, band: Optional[int] = None) -> None:
        self.path = str(path)
        self._src = open_raster(path)
        try:
            self.band = _height_band(path, self._src.count, band)
        except InputError:
            self._src.close()
            raise
        if self._src.crs is None:
            self._src.close()
            raise InputError(path, "has no coordinate reference system",
                             "Assign one, e.g. gdal_edit.py -a_srs EPSG:2154 FILE")
        bounds = transform_bounds(self._src.crs, grid.crs, *self._src.bounds, densify_pts=21)
        if not _overlap(bounds, grid.bounds):
            self._src.close()
            raise InputError(path, f"does not overlap the target area (reference {_fmt(bounds)} vs "
                             f"target {_fmt(grid.bounds)} in {grid.crs.to_string()})",
                             "Give a reference DSM that covers the predicted area")
        self.resampling = reference_resampling(self._src, grid)
        nodata = self._src.nodata
        self._vrt = WarpedVRT(self._src, crs=grid.crs, transform=grid.transform, width=grid.width,
                              height=grid.height, resampling=self.resampling, dtype="float32",
                              src_nodata=nodata, nodata=np.nan,
                              # each band's own nodata: by default GDAL takes a pixel as nodata only where
                              # every band is, so band 2's holes would be averaged in beside band 1's data
                              UNIFIED_SRC_NODATA="NO")

    def read(self, window: Window) -> np.ndarray:
        values = read_or_fail(self._vrt, self.path, self.band, window=window, masked=True)
        return values.filled(np.nan).astype(np.float32, copy=False)

    def close(self) -> None:
        self._vrt.close()
        self._src.close()

    def __enter__(self) -> "ReferenceOnGrid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _height_band(path: object, count: int, band: Optional[int]) -> int:
    """The 1-based band holding heights: the only one, or the one chosen among several."""
    if band is None:
        if count != 1:
            raise InputError(path, f"has {count} bands but a height raster has one (band 1 would be taken "
                             "without being asked for)", "Choose the band that holds heights "
                             "(compare --reference-band N, 'Reference band' in Processing) or extract it: "
                             "gdal_translate -b N IN OUT")
        return 1
    if not 1 <= int(band) <= count:
        raise InputError(f"reference band {band}", f"is not a band of {path}, which has {count}",
                         f"Choose a band from 1 to {count}")
    return int(band)


def _fmt(bounds: tuple) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in bounds) + "]"


def read_height_grid(path: str | os.PathLike) -> tuple[rasterio.DatasetReader, Grid]:
    """Open a single-band height raster and describe its grid (north-up rasters only)."""
    src = open_raster(path)
    if src.crs is None or src.transform.e > 0 or src.transform.b or src.transform.d:
        src.close()
        raise InputError(path, "is not a north-up georeferenced raster",
                         "Give the output of 'alphaearth-height predict'")
    if src.count != 1:
        src.close()
        raise InputError(path, f"has {src.count} bands but a predicted height raster has one",
                         "Give the output of 'alphaearth-height predict'")
    return src, Grid(src.crs, src.transform, src.width, src.height)


def compare_heights(predicted: str | os.PathLike, reference: str | os.PathLike,
                    out_path: Optional[str | os.PathLike] = None,
                    metrics_path: Optional[str | os.PathLike] = None,
                    regions: Optional[dict[str, Window]] = None,
                    bin_edges: Optional[list[float]] = None, plots_prefix: Optional[str] = None,
                    reference_band: Optional[int] = None, terrain: Optional[str | os.PathLike] = None) -> dict:
    """Difference raster and metrics (overall, per height bin, per named region window);
    with ``plots_prefix``, also PNG plots ``<prefix>_scatter.png`` and ``<prefix>_histogram.png``.

    Beyond MAX_SAMPLES valid pixels the figures come from a fixed-seed random sample,
    recorded in the result as ``sampled``. ``reference_band`` (1-based) picks the height
    band of a reference with several; one with several and none chosen is refused.

    With ``terrain`` (the coarse terrain raster a terrain-relative prediction was made
    with), the result also holds ``baselines["terrain alone"]``: the same figures for
    that terrain resampled onto the grid, as if it were the prediction, on the same pixels.
    """
    check_outputs({"the difference raster": out_path, "the metrics": metrics_path}, inputs=[predicted, reference])
    src, grid = read_height_grid(predicted)
    with src, ReferenceOnGrid(reference, grid, reference_band) as ref, contextlib.ExitStack() as stack:
        ground = stack.enter_context(ReferenceOnGrid(terrain, grid)) if terrain else None
        keep = min(1.0, MAX_SAMPLES / max(grid.width * grid.height, 1))
        rng = np.random.default_rng(0)
        pairs = _Pairs(regions or {}, ground)
        if out_path:
            with atomic_write(out_path) as tmp:
                with rasterio.open(tmp, "w", **float_profile(grid)) as dst:
                    describe_band(dst, "predicted minus reference height", "m",
                                  PREDICTED=Path(predicted).name, REFERENCE=Path(reference).name,
                                  REFERENCE_RESAMPLING=ref.resampling.name)
                    _scan(src, ref, grid, keep, rng, pairs, dst)
                    if not pairs.count:
                        raise _no_pairs(predicted, reference)
        else:
            _scan(src, ref, grid, keep, rng, pairs, None)
        resampling = ref.resampling.name
    if not pairs.count:
        raise _no_pairs(predicted, reference)
    result = pairs.metrics(bin_edges)
    if terrain:
        result["baselines"]["terrain alone"]["terrain"] = str(terrain)
    if plots_prefix:
        result["plots"] = render_accuracy_plots(*pairs.sample, plots_prefix, result["overall"])
    result.update(predicted=str(predicted), reference=str(reference), difference=str(out_path or ""),
                  reference_resampling=resampling, sampled=keep < 1.0, crs=grid.crs.to_string())
    if metrics_path:
        with atomic_write(metrics_path) as tmp:
            Path(tmp).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return result


def _no_pairs(predicted: object, reference: object) -> InputError:
    return InputError(reference, f"has no valid pixel where {predicted} has data",
                      "Check the reference's nodata value and that both rasters cover the same area")


def _scan(src, ref: ReferenceOnGrid, grid: Grid, keep: float, rng, pairs: "_Pairs", dst) -> None:
    for window in iter_windows(grid.width, grid.height, BLOCK):
        pred = read_or_fail(src, src.name, 1, window=window, masked=True).filled(np.nan).astype(np.float32)
        reference = ref.read(window)
        diff = pred - reference
        ok = np.isfinite(diff)
        if dst is not None:
            dst.write(np.where(ok, diff, OUTPUT_NODATA).astype(np.float32), 1, window=window)
        if keep < 1.0:
            ok &= rng.random(ok.shape) < keep
        pairs.add(window, pred, reference, ok, pairs.ground.read(window) if pairs.ground is not None else None)


class _Pairs:
    """Valid (prediction, reference) samples with the named regions each falls in."""

    def __init__(self, regions: dict[str, Window], ground: Optional[ReferenceOnGrid] = None) -> None:
        self.regions = regions
        self.ground = ground  # a terrain-alone baseline, sampled on the same pixels
        self.terrain: list[np.ndarray] = []
        self.pred: list[np.ndarray] = []
        self.ref: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.count = 0

    def add(self, window: Window, pred: np.ndarray, ref: np.ndarray, ok: np.ndarray,
            terrain: Optional[np.ndarray] = None) -> None:
        rows, cols = np.nonzero(ok)
        if terrain is not None:
            self.terrain.append(terrain[ok])
        self.pred.append(pred[ok])
        self.ref.append(ref[ok])
        self.rows.append((rows + window.row_off).astype(np.int32))
        self.cols.append((cols + window.col_off).astype(np.int32))
        self.count += int(ok.sum())

    def metrics(self, bin_edges: Optional[list[float]]) -> dict:
        p, r = np.concatenate(self.pred), np.concatenate(self.ref)
        edges = nice_bin_edges(r) if bin_edges is None else bin_edges
        result = {"overall": height_metrics(p, r), "bins": binned_metrics(p, r, edges), "baselines": {}}
        if self.ground is not None:
            t = np.concatenate(self.terrain)
            result["baselines"]["terrain alone"] = {"overall": height_metrics(t, r),
                                                    "bins": binned_metrics(t, r, edges)}
        pick = np.random.default_rng(1).permutation(p.size)[:PLOT_SAMPLES]
        self.sample = (p[pick], r[pick])
        rows, cols = np.concatenate(self.rows), np.concatenate(self.cols)
        result["regions"] = {}
        for name, w in self.regions.items():
            inside = ((rows >= w.row_off) & (rows < w.row_off + w.height)
                      & (cols >= w.col_off) & (cols < w.col_off + w.width))
            result["regions"][name] = {"window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
                                       **height_metrics(p[inside], r[inside])}
        return result
