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
from ..plugin.core.rasters import check_new_folder, make_partial_dir, read_height
from ..plugin.core.resample import ReferenceOnGrid
from ..plugin.core.terrain import predict_surface, terrain_on_embeddings_grid
from ..plugin.core.uncertainty import predict_uncertainty
from .baseline import fit_on_area, predict_map
from .calibration import interval_report
from .data import load_pair
from .splits import SplitSpec, make_areas

AREAS = ("train", "validation", "test")
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
    pair = load_pair(embeddings, reference)
    areas = make_areas(spec, pair.grid.height, pair.grid.width)
    predicted, difference = folder / names["prediction"], folder / names["difference"]
    log(f"evaluating {package.name}: predicting {pair.grid.width}x{pair.grid.height} px")
    result = predict_surface(pair.embeddings_path, package, predicted, terrain, device=device, progress=progress)
    log(f"predicted in {result.seconds:.1f} s on {result.device}")
    if uncertainty:
        predict_uncertainty(pair.embeddings_path, package, folder / names["uncertainty"], device=device)
    comparison = compare_heights(predicted, pair.reference_path, difference, plots_prefix=str(folder / "overall"))
    pred = read_height(predicted)
    valid = pair.label_mask & np.isfinite(pred)
    if not (areas.train & valid).any() or not (areas.test & valid).any():
        raise InputError(pair.reference_path, "has no valid pixel in the train or the test area of this split",
                         "Check the split options against the area the reference covers")
    ridge = predict_map(fit_on_area(pair.embeddings, pair.reference, areas.train & valid), pair.embeddings, valid)
    edges = nice_bin_edges(pair.reference[valid])
    ground = terrain_alone(terrain, pair) if terrain else None
    report_areas = {name: _area_metrics(pred, ridge, pair.reference, getattr(areas, name) & valid, edges, ground)
                    for name in AREAS}
    test = areas.test & valid
    render_accuracy_plots(pred[test], pair.reference[test], str(folder / "test"), report_areas["test"]["model"])
    render_error_by_bin({f"{label} {name}": report_areas[name][f"{key}_bins"]
                         for name in ("train", "test") for key, label in BASELINE_LABELS if f"{key}_bins" in
                         report_areas[name]},
                        folder / "error_by_height.png", title=f"{package.name}: error by reference height")
    render_maps(folder / names["maps"], predicted, difference, reference_on_grid=pair.reference, outline=areas.test,
                title="Reference, prediction and difference; the test area is outlined")
    plots = sorted(names["maps"] if name == REPORT_FILES["maps"] else name for name in REPORT_PLOTS)
    report = {"model": {"name": package.name, "path": str(package.path), "card_metrics": package.card.get("metrics")},
              "embeddings": str(pair.embeddings_path), "reference": str(pair.reference_path),
              "terrain": str(terrain) if terrain else None, "terrain_name": terrain_label(terrain),
              "split": {**spec.as_dict(), "pixels": areas.as_dict()},
              "overall": comparison["overall"], "overall_bins": comparison["bins"], "areas": report_areas,
              "plots": plots, "uncertainty": names["uncertainty"] if uncertainty and keep_rasters else None}
    if uncertainty:  # how often the reference lies within prediction ± k x spread (nominally 90 %)
        report["uncertainty_interval"] = interval_report(package.card, pred, read_height(folder / names["uncertainty"]),
                                                         pair.reference, areas, valid)
    if ground is not None:  # the whole area, like the compare step's figures for the model
        report["overall_terrain"] = height_metrics(ground[valid], pair.reference[valid])
        report["overall_terrain_bins"] = binned_metrics(ground[valid], pair.reference[valid], edges)
    (folder / names["report"]).write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (folder / names["markdown"]).write_text(report_markdown(report))
    return report


def terrain_alone(terrain: str, pair) -> np.ndarray:
    """The coarse terrain on the pair's grid (a DEM product is fetched, from the cache when it can)."""
    path = terrain_on_embeddings_grid(terrain, pair.embeddings_path)
    with ReferenceOnGrid(path, pair.grid) as ground:
        return ground.read(Window(0, 0, pair.grid.width, pair.grid.height))


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
    rows = {f"{label} {name}": areas[name][who] for name in AREAS for who, label in BASELINE_LABELS
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
            bins = {f"{b['bin_min']:.0f}–{b['bin_max']:.0f} m": b for b in areas[name].get(f"{who}_bins", [])}
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
