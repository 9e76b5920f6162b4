"""Evaluation report for a model on an area with a reference DSM: the compare step's
metrics overall, per area of a split (train / validation / test) and per height bin,
next to the paper's per-pixel ridge baseline fitted on the same split's train area and,
for a model trained relative to a coarse terrain, that terrain alone (the baseline such a
model has to beat: a free global DEM is already a height map).

The report folder holds report.json, report.md and PNG plots (REPORT_PLOTS); the
prediction and difference rasters too unless ``keep_rasters`` is off. It appears under
its name only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from rasterio.windows import Window

from ..plugin.core.compare import compare_heights
from ..plugin.core.dem import terrain_label
from ..plugin.core.errors import InputError
from ..plugin.core.metrics import binned_metrics, format_markdown_table, height_metrics, json_safe, nice_bin_edges
from ..plugin.core.models import ModelPackage, load_model
from ..plugin.core.plots import render_accuracy_plots, render_error_by_bin, render_maps
from ..plugin.core.rasters import (EmbeddingRaster, check_new_folder, make_partial_dir, open_raster, read_or_fail,
                                   valid_mask)
from ..plugin.core.resample import ReferenceOnGrid
from ..plugin.core.terrain import predict_surface, terrain_on_embeddings_grid
from ..plugin.core.uncertainty import predict_uncertainty
from .baseline import RidgeBaseline
from .calibration import interval_report
from .patches import SCAN_TILE, bounded_cache
from .splits import Areas, AreaLayout, SplitSpec

AREAS = ("train", "validation", "test")
MAX_PIXELS = 2_000_000    # pixels a report scores at most (a fixed-seed random share beyond)
RIDGE_PIXELS = 200_000    # pixels the ridge baseline is fitted on at most
MAP_SIDE = 1000           # the maps' reference picture is decimated to at most this many pixels a side
# file -> (width, height) in pixels; sizes follow from each plot's figsize at 100 dpi
REPORT_PLOTS = {"overall_scatter.png": (500, 450), "overall_histogram.png": (500, 400),
                "test_scatter.png": (500, 450), "test_histogram.png": (500, 400),
                "error_by_height.png": (640, 400), "maps.png": (1560, 500)}
TABLE_COLUMNS = ("n", "r2", "rmse", "mae", "mean_diff", "median_diff", "nmad", "le90")
# (key in an area's metrics, label in tables and plots); "terrain" only with a terrain input
BASELINE_LABELS = (("model", "model"), ("ridge", "ridge"), ("terrain", "terrain alone"))


def split_from_card(card: dict) -> SplitSpec:
    """The split the model was trained with (so its test area is judged as such)."""
    return SplitSpec.from_dict(card.get("training", {}).get("split", {}))


# What a report folder holds under which name (the demo gives some of them its own names)
REPORT_FILES = {"prediction": "prediction.tif", "difference": "difference.tif", "uncertainty": "uncertainty.tif",
                "maps": "maps.png", "report": "report.json", "markdown": "report.md"}
RASTER_FILES = ("prediction", "difference", "uncertainty")


def evaluate_model(model: str | os.PathLike | ModelPackage, embeddings: str | os.PathLike,
                   reference: str | os.PathLike, out_dir: str | os.PathLike, spec: Optional[SplitSpec] = None,
                   *, terrain: Optional[str] = None, device: str = "auto", keep_rasters: bool = True,
                   uncertainty: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write the report folder and return the report (as written to report.json)."""
    package = model if isinstance(model, ModelPackage) else load_model(model)
    out = Path(out_dir)
    check_new_folder(out, "the report")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_partial_dir(out)
    try:
        with bounded_cache():
            report = write_report(package, embeddings, reference, staging, spec, terrain=terrain, device=device,
                                  uncertainty=uncertainty, keep_rasters=keep_rasters, log=log)
        if not keep_rasters:
            for name in RASTER_FILES:
                (staging / REPORT_FILES[name]).unlink(missing_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"evaluation report written to {out}")
    return report


def write_report(package: ModelPackage, embeddings: str | os.PathLike, reference: str | os.PathLike, folder: Path,
                 spec: Optional[SplitSpec] = None, *, terrain: Optional[str] = None, device: str = "auto",
                 uncertainty: bool = False, keep_rasters: bool = True, files: Optional[dict[str, str]] = None,
                 progress: Optional[Callable[[int, int], None]] = None, log: Callable[[str], None] = print) -> dict:
    """Predict, compare and score the model against ridge (and the terrain alone) into an existing
    ``folder``; return the report. ``files`` renames some of REPORT_FILES (the demo's names);
    ``keep_rasters`` off only records that the caller removes the rasters afterwards."""
    names = {**REPORT_FILES, **(files or {})}
    spec = spec or split_from_card(package.card)
    with EmbeddingRaster(embeddings) as source:
        grid = source.grid
    layout = AreaLayout(spec, grid.height, grid.width)
    predicted, difference = folder / names["prediction"], folder / names["difference"]
    log(f"evaluating {package.name}: predicting {grid.width}x{grid.height} px")
    result = predict_surface(str(embeddings), package, predicted, terrain, device=device, progress=progress)
    log(f"predicted in {result.seconds:.1f} s on {result.device}")
    if uncertainty:
        predict_uncertainty(str(embeddings), package, folder / names["uncertainty"], device=device)
    comparison = compare_heights(predicted, reference, difference, plots_prefix=str(folder / "overall"))
    ground_path = terrain_on_embeddings_grid(terrain, str(embeddings)) if terrain else None
    pixels = _Pixels(str(embeddings), str(reference), predicted, layout, ground_path,
                     folder / names["uncertainty"] if uncertainty else None)
    if not (pixels.area == 0).any() or (spec.test_fraction and not (pixels.area == 2).any()):
        raise InputError(reference, "has no valid pixel in the train or the test area of this split",
                         "Check the split options against the area the reference covers")
    areas = Areas(*(pixels.area == k for k in range(3)))
    edges = nice_bin_edges(pixels.reference)
    # a split without a test area (--test-fraction 0: the user tests elsewhere) reports train and validation only
    report_areas = {name: _area_metrics(pixels.pred, pixels.ridge, pixels.reference, getattr(areas, name), edges,
                                        pixels.ground) for name in AREAS if getattr(areas, name).any()}
    judged = [name for name in ("train", "test") if name in report_areas]
    skipped = set() if "test" in report_areas else {"test_scatter.png", "test_histogram.png"}
    if "test" in report_areas:
        render_accuracy_plots(pixels.pred[areas.test], pixels.reference[areas.test], str(folder / "test"),
                              report_areas["test"]["model"])
    render_error_by_bin({f"{label} {name}": report_areas[name][f"{key}_bins"]
                         for name in judged for key, label in BASELINE_LABELS if f"{key}_bins" in
                         report_areas[name]},
                        folder / "error_by_height.png", title=f"{package.name}: error by reference height")
    has_test = bool(areas.test.any())
    render_maps(folder / names["maps"], predicted, difference, reference_on_grid=pixels.picture,
                outline=pixels.test_picture if has_test else None,
                title="Reference, prediction and difference; the test area is outlined" if has_test
                else "Reference, prediction and difference (no test area)")
    plots = sorted(names["maps"] if name == REPORT_FILES["maps"] else name for name in REPORT_PLOTS
                   if name not in skipped)
    report = {"model": {"name": package.name, "path": str(package.path), "card_metrics": package.card.get("metrics")},
              "embeddings": str(embeddings), "reference": str(reference),
              "terrain": str(terrain) if terrain else None, "terrain_name": terrain_label(terrain),
              "split": {**spec.as_dict(), "pixels": pixels.counts},
              "overall": comparison["overall"], "overall_bins": comparison["bins"], "areas": report_areas,
              "sampled": pixels.keep < 1.0,
              "plots": plots, "uncertainty": names["uncertainty"] if uncertainty and keep_rasters else None}
    valid = np.ones(len(pixels.pred), dtype=bool)
    if uncertainty:  # how often the reference lies within prediction ± k x spread (nominally 90 %)
        report["uncertainty_interval"] = interval_report(package.card, pixels.pred, pixels.spread, pixels.reference,
                                                         areas, valid)
    if pixels.ground is not None:  # the whole area, like the compare step's figures for the model
        report["overall_terrain"] = height_metrics(pixels.ground, pixels.reference)
        report["overall_terrain_bins"] = binned_metrics(pixels.ground, pixels.reference, edges)
    (folder / names["report"]).write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (folder / names["markdown"]).write_text(report_markdown(report))
    return report


class _Pixels:
    """The scene's valid pixels (labelled, and predicted), gathered tile by tile: prediction,
    reference, the ridge baseline's height (fitted on the train area first, in a pass of its
    own), the terrain alone, the spread and the area (0 train, 1 validation, 2 test, 3 buffer).
    Beyond MAX_PIXELS a fixed-seed random share is kept (``keep``), as the compare step does,
    so memory does not grow with the area; ``counts`` are the areas' whole pixel counts.
    ``picture`` and ``test_picture`` are the reference and the test area decimated for the maps.
    """

    def __init__(self, embeddings: str, reference: str, predicted: Path, layout: AreaLayout,
                 ground: Optional[str], spread: Optional[Path]) -> None:
        grid_pixels = layout.height * layout.width
        self.keep = min(1.0, MAX_PIXELS / max(grid_pixels, 1))
        step = max(1, -(-max(layout.height, layout.width) // MAP_SIDE))
        self.counts = {"train": 0, "validation": 0, "test": 0}
        with EmbeddingRaster(embeddings) as source, open_raster(predicted) as pred_src, \
                ReferenceOnGrid(reference, source.grid) as ref, contextlib.ExitStack() as stack:
            ground_src = stack.enter_context(ReferenceOnGrid(ground, source.grid)) if ground else None
            spread_src = stack.enter_context(open_raster(spread)) if spread else None

            def tiles(counting: bool = False):
                rng = np.random.default_rng(0)
                for row in range(0, layout.height, SCAN_TILE):
                    for col in range(0, layout.width, SCAN_TILE):
                        h, w = min(SCAN_TILE, layout.height - row), min(SCAN_TILE, layout.width - col)
                        window = Window(col, row, w, h)
                        x, heights = source.read(window), ref.read(window)
                        pred = read_or_fail(pred_src, predicted, 1, window=window, masked=True).filled(np.nan)
                        areas = layout.areas(row, col, h, w)
                        if counting:
                            for name in self.counts:
                                self.counts[name] += int(getattr(areas, name).sum())
                        valid = valid_mask(x) & np.isfinite(heights) & np.isfinite(pred)
                        kept = valid & (rng.random(valid.shape) < self.keep)
                        yield window, x, heights, pred, areas, kept

            # pass 1: the ridge baseline's fit on (a fixed-seed sample of) the train area
            features, targets = [], []
            fit_keep = min(1.0, RIDGE_PIXELS / max(grid_pixels, 1))
            sample = np.random.default_rng(1)
            for _, x, heights, _, areas, kept in tiles():
                pick = kept & areas.train & (sample.random(kept.shape) < fit_keep)
                features.append(x[:, pick].T)
                targets.append(heights[pick])
            features, targets = np.concatenate(features), np.concatenate(targets)
            ridge = RidgeBaseline().fit(features, targets) if len(targets) else None
            del features, targets
            # pass 2: every kept pixel's values
            columns = {name: [] for name in ("pred", "reference", "ridge", "ground", "spread", "area")}
            picture = []
            for window, x, heights, pred, areas, kept in tiles(counting=True):
                code = np.full(kept.shape, 3, dtype=np.int8)
                for k, name in enumerate(("train", "validation", "test")):
                    code[getattr(areas, name)] = k
                columns["pred"].append(pred[kept])
                columns["reference"].append(heights[kept])
                columns["ridge"].append(ridge.predict(x[:, kept].T) if ridge else np.full(int(kept.sum()), np.nan))
                columns["area"].append(code[kept])
                if ground_src is not None:
                    columns["ground"].append(ground_src.read(window)[kept])
                if spread_src is not None:
                    columns["spread"].append(read_or_fail(spread_src, spread, 1, window=window,
                                                          masked=True).filled(np.nan)[kept])
                rows = np.s_[(-window.row_off) % step::step, (-window.col_off) % step::step]
                picture.append((window, heights[rows], areas.test[rows]))
        joined = {name: np.concatenate(values).astype(np.int8 if name == "area" else np.float32)
                  if values else None for name, values in columns.items()}
        self.pred, self.reference, self.ridge = joined["pred"], joined["reference"], joined["ridge"]
        self.ground, self.spread, self.area = joined["ground"], joined["spread"], joined["area"]
        self.picture, self.test_picture = _assemble(picture, step, layout.height, layout.width)


def _assemble(parts: list, step: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimated tiles (every ``step``-th row and column of the grid) put back together."""
    image = np.full((-(-height // step), -(-width // step)), np.nan, dtype=np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    for window, values, test in parts:
        r, c = -(-window.row_off // step), -(-window.col_off // step)
        image[r:r + values.shape[0], c:c + values.shape[1]] = values
        mask[r:r + test.shape[0], c:c + test.shape[1]] = test
    return image, mask


def _area_metrics(pred: np.ndarray, ridge: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                  edges: np.ndarray, ground: Optional[np.ndarray] = None) -> dict:
    """Model and ridge (and, with a terrain input, the terrain alone) on the area's pixels."""
    result = {"model": height_metrics(pred[mask], reference[mask]),
              "ridge": height_metrics(ridge[mask], reference[mask]),
              "model_bins": binned_metrics(pred[mask], reference[mask], edges),
              "ridge_bins": binned_metrics(ridge[mask], reference[mask], edges)}
    if ground is not None:
        result["terrain"] = height_metrics(ground[mask], reference[mask])
        result["terrain_bins"] = binned_metrics(ground[mask], reference[mask], edges)
    return result


def report_markdown(report: dict) -> str:
    """The report's tables: per area model vs ridge, then per height bin on train and test."""
    areas, split = report["areas"], report["split"]
    rows = {f"{label} {name}": areas[name][who] for name in AREAS if name in areas for who, label in BASELINE_LABELS
            if who in areas[name] and areas[name][who]["n"]}
    terrain = report.get("terrain_name")
    whole = {"model": report["overall"]}
    if report.get("overall_terrain"):
        whole["terrain alone"] = report["overall_terrain"]
    layout = f"test side {split['direction']}" if split["kind"] == "contiguous" else f"{split['block_size']} px blocks"
    parts = [f"# Evaluation of {report['model']['name']}", "",
             f"Embeddings `{Path(report['embeddings']).name}`, reference `{Path(report['reference']).name}`; "
             f"split {split['kind']} ({layout}, test fraction {split['test_fraction']}, buffer {split['buffer']} px). "
             "Differences are predicted − reference, in metres; ridge is the per-pixel baseline fitted on the "
             "train area." + (f" The model predicts height above a coarse terrain ({terrain}); \"terrain alone\" "
                              "scores that terrain, resampled onto the grid, as if it were the prediction: the "
                              "baseline the model has to beat." if terrain else ""),
             "", "## By area", "", format_markdown_table(rows, TABLE_COLUMNS), "",
             "## Whole area (compare step)", "", format_markdown_table(whole, TABLE_COLUMNS)]
    for who, label in (("model", "Model"), ("terrain", "Terrain alone")):
        for name in ("train", "test"):
            bins = {f"{b['bin_min']:.0f}–{b['bin_max']:.0f} m": b for b in areas.get(name, {}).get(f"{who}_bins", [])}
            if bins:
                parts += ["", f"## {label} by reference height, {name} area", "",
                          format_markdown_table(bins, TABLE_COLUMNS)]
    interval = report.get("uncertainty_interval")
    if interval:
        cover = {name: {"coverage": share, "median_half_width_m": interval["median_half_width_m"][name]}
                 for name, share in interval["coverage"].items()}
        parts += ["", f"## Uncertainty: prediction ± {interval['k']:.2f} x spread, a nominal "
                      f"{interval['level']:.0%} interval", "",
                  f"`uncertainty.tif` holds the spread over flips and rotations (test-time augmentation); k from "
                  f"the {interval['k_from']}. Coverage: the share of pixels whose reference lies inside.", "",
                  format_markdown_table(cover, ("coverage", "median_half_width_m"))]
    parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]]
    return "\n".join(parts) + "\n"
