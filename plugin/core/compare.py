"""Predicted vs reference heights: resample the reference onto the prediction grid,
write the difference raster (prediction − reference) and compute accuracy figures."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from rasterio.windows import Window

from .errors import InputError
from .metrics import binned_metrics, height_metrics, json_safe, nice_bin_edges
from .plots import render_accuracy_plots
from .rasters import atomic_write, check_outputs, height_blocks, map_height_raster, read_height_grid
from .resample import ReferenceOnGrid

MAX_SAMPLES = 2_000_000  # pairs kept for the figures: memory bounded at any area; a mean's standard error is σ/1400
PLOT_SAMPLES = 200_000


def compare_heights(predicted: str | os.PathLike, reference: str | os.PathLike,
                    out_path: Optional[str | os.PathLike] = None,
                    metrics_path: Optional[str | os.PathLike] = None,
                    bin_edges: Optional[list[float]] = None, plots_prefix: Optional[str] = None,
                    reference_band: Optional[int] = None, terrain: Optional[str | os.PathLike] = None) -> dict:
    """Difference raster and metrics (overall and per height bin); with ``plots_prefix``,
    also PNG plots ``<prefix>_scatter.png`` and ``<prefix>_histogram.png``.

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
        pairs = _Pairs(ref, ground, keep=min(1.0, MAX_SAMPLES / max(grid.width * grid.height, 1)))
        if out_path:
            map_height_raster(predicted, out_path, pairs.add, "predicted minus reference height",
                              tags={"PREDICTED": Path(predicted).name, "REFERENCE": Path(reference).name,
                                    "REFERENCE_RESAMPLING": ref.resampling.name},
                              before_commit=lambda: pairs.check(predicted, reference))
        else:
            for window, pred in height_blocks(src):
                pairs.add(pred, window)
        resampling = ref.resampling.name
    pairs.check(predicted, reference)
    result = pairs.metrics(bin_edges)
    if terrain:
        result["baselines"]["terrain alone"]["terrain"] = str(terrain)
    if plots_prefix:
        result["plots"] = render_accuracy_plots(*pairs.sample, plots_prefix, result["overall"])
    result.update(predicted=str(predicted), reference=str(reference), difference=str(out_path or ""),
                  reference_resampling=resampling, sampled=pairs.keep < 1.0, crs=grid.crs.to_string())
    if metrics_path:
        with atomic_write(metrics_path) as tmp:
            Path(tmp).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return result


class _Pairs:
    """Valid (prediction, reference) samples gathered block by block, kept at random with
    probability ``keep`` (fixed seed) so huge areas stay within memory."""

    def __init__(self, ref: ReferenceOnGrid, ground: Optional[ReferenceOnGrid], keep: float) -> None:
        self.ref = ref
        self.ground = ground  # a terrain-alone baseline, sampled on the same pixels
        self.keep = keep
        self.rng = np.random.default_rng(0)
        self.terrain: list[np.ndarray] = []
        self.pred: list[np.ndarray] = []
        self.reference: list[np.ndarray] = []
        self.count = 0

    def add(self, pred: np.ndarray, window: Window) -> np.ndarray:
        """Record one block's pairs; return its difference (NaN where either side has no data)."""
        reference = self.ref.read(window)
        diff = pred - reference
        ok = np.isfinite(diff)
        if self.keep < 1.0:
            ok &= self.rng.random(ok.shape) < self.keep
        if self.ground is not None:
            self.terrain.append(self.ground.read(window)[ok])
        self.pred.append(pred[ok])
        self.reference.append(reference[ok])
        self.count += int(ok.sum())
        return diff

    def check(self, predicted: object, reference: object) -> None:
        if not self.count:
            raise InputError(reference, f"has no valid pixel where {predicted} has data",
                             "Check the reference's nodata value and that both rasters cover the same area")

    def metrics(self, bin_edges: Optional[list[float]]) -> dict:
        p, r = np.concatenate(self.pred), np.concatenate(self.reference)
        edges = nice_bin_edges(r) if bin_edges is None else bin_edges
        result = {"overall": height_metrics(p, r), "bins": binned_metrics(p, r, edges), "baselines": {}}
        if self.ground is not None:
            t = np.concatenate(self.terrain)
            result["baselines"]["terrain alone"] = {"overall": height_metrics(t, r),
                                                    "bins": binned_metrics(t, r, edges)}
        pick = np.random.default_rng(1).permutation(p.size)[:PLOT_SAMPLES]
        self.sample = (p[pick], r[pick])
        return result
