"""Regional bias correction: a model applied away from its training area is often shifted
(the paper's weak spot). A few reference heights on the target area — points from a CSV
or a patch of a reference raster — fit an offset, a linear map or a quantile mapping;
the one with the lowest cross-validated RMSE on those samples (the offset unless another is
clearly better, and no implausible slope) is applied to the whole prediction and recorded
in the corrected raster's tags.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from .choices import BIAS_METHODS, check_choice
from .compare import compare_heights
from .errors import InputError
from .metrics import format_metrics_table, height_metrics
from .rasters import GDAL_ERRORS, Grid, check_output_path, map_height_raster, read_height, read_height_grid
from .resample import ReferenceOnGrid

METHODS = tuple(m for m in BIAS_METHODS if m != "auto")  # the mappings 'auto' chooses among
MIN_SAMPLES = {"offset": 1, "linear": 5, "quantile": 20}
QUANTILES = 21
FOLDS = 5
MARGIN = 0.1                 # a richer mapping must beat the offset's cross-validated RMSE by 10 %
SLOPE_RANGE = (0.5, 2.0)     # linear maps outside it are not chosen automatically


@dataclass
class Correction:
    """prediction -> corrected height; ``params`` say how (and are written to the tags)."""

    method: str
    params: dict

    def apply(self, values: np.ndarray) -> np.ndarray:
        p = self.params
        if self.method == "offset":
            return values + p["offset"]
        if self.method == "linear":
            return p["slope"] * values + p["intercept"]
        xp, fp = np.asarray(p["predicted_quantiles"]), np.asarray(p["reference_quantiles"])
        mapped = np.interp(values, xp, fp)
        # beyond the samples' range: keep the end quantiles' offset rather than clamping
        return np.where(values < xp[0], values + fp[0] - xp[0],
                        np.where(values > xp[-1], values + fp[-1] - xp[-1], mapped))


def fit_correction(method: str, predicted: np.ndarray, reference: np.ndarray) -> Correction:
    d = reference - predicted
    if method == "offset":
        return Correction(method, {"offset": float(np.median(d))})
    if method == "linear":
        slope, intercept = np.polyfit(predicted.astype(np.float64), reference.astype(np.float64), 1)
        return Correction(method, {"slope": float(slope), "intercept": float(intercept)})
    q = np.linspace(0, 1, QUANTILES)
    xp = np.maximum.accumulate(np.quantile(predicted, q))
    xp = xp + np.arange(QUANTILES) * 1e-6  # strictly increasing for np.interp
    return Correction(method, {"predicted_quantiles": xp.tolist(),
                               "reference_quantiles": np.quantile(reference, q).tolist()})


def cross_validated_rmse(method: str, predicted: np.ndarray, reference: np.ndarray, seed: int = 0) -> float:
    """RMSE of ``method`` on held-out folds of the samples (leave-one-out below FOLDS samples)."""
    n = len(predicted)
    folds = np.random.default_rng(seed).permutation(n) % min(FOLDS, n)
    errors = []
    for k in range(folds.max() + 1):
        held = folds == k
        if held.all():
            continue
        fitted = fit_correction(method, predicted[~held], reference[~held])
        errors.append(fitted.apply(predicted[held]) - reference[held])
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2))) if errors else float("nan")


def choose_correction(predicted: np.ndarray, reference: np.ndarray, method: str = "auto") -> tuple[Correction, dict]:
    """The named method, or under 'auto' the one with the lowest cross-validated RMSE."""
    n = len(predicted)
    candidates = [m for m in (METHODS if method == "auto" else (method,)) if n >= MIN_SAMPLES[m]]
    if not candidates:
        raise InputError(f"{n} reference sample(s)", f"are too few for the {method} correction",
                         f"Give at least {MIN_SAMPLES[method if method != 'auto' else 'offset']} samples")
    scores = {m: cross_validated_rmse(m, predicted, reference) if n > 1 else float("nan") for m in candidates}
    if method == "auto":
        candidates = [m for m in candidates if m != "linear" or _plausible(fit_correction(m, predicted, reference))]
        # the simplest wins unless another is clearly better: samples from one patch cover a narrow
        # height range, and a richer mapping fitted there extrapolates badly to the rest of the area
        simplest = scores[candidates[0]]
        candidates = [m for m in candidates if m == candidates[0] or scores[m] < (1 - MARGIN) * simplest]
    best = min(candidates, key=lambda m: scores[m] if np.isfinite(scores[m]) else np.inf)
    return fit_correction(best, predicted, reference), scores


def _plausible(correction: Correction) -> bool:
    """A linear map that flips or wildly stretches heights is an artefact of narrow samples."""
    return SLOPE_RANGE[0] <= correction.params["slope"] <= SLOPE_RANGE[1]


@dataclass
class BiasResult:
    path: Path
    correction: Correction
    samples: int
    cv_rmse: dict
    on_samples: dict = field(default_factory=dict)   # before / after (in-sample)
    on_check: dict = field(default_factory=dict)     # before / after on --check-reference

    def summary(self) -> str:
        lines = [f"wrote {self.path}: {self.correction.method} correction from {self.samples} samples "
                 f"({json.dumps(_rounded(self.correction.params))})",
                 "cross-validated RMSE on the samples: " + ", ".join(f"{m} {v:.2f} m" for m, v in self.cv_rmse.items())]
        for label, table in (("samples", self.on_samples), ("check reference", self.on_check)):
            if table:
                lines += [f"on the {label}:", format_metrics_table(table)]
        return "\n".join(lines)


def _rounded(params: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else f"{len(v)} quantiles") for k, v in params.items()}


CSV_FIX = "Give a CSV with a header line x,y,height and one point per line below"
POINTS_CRS_FIX = ("Give the CSV's own CRS with --points-crs (e.g. EPSG:4326 for longitude/latitude; "
                  "default the prediction's), or points inside the predicted area")


def read_csv_points(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and height columns of a CSV (header names in any case; a UTF-8 byte-order mark is fine)."""
    try:
        # utf-8-sig: spreadsheet programs start UTF-8 CSVs with a byte-order mark, which would
        # otherwise become part of the first column's name ("\ufeffx")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            lines = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise InputError(path, "does not exist", "Check the path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot be read as a CSV ({type(exc).__name__}: {exc})", CSV_FIX) from None
    if header is None:
        raise InputError(path, "is empty", CSV_FIX)
    names = [name.strip().lower() for name in header]
    missing = [c for c in ("x", "y", "height") if c not in names]
    if missing:
        raise InputError(path, f"has no column {', '.join(missing)} (its header is {','.join(header)!r})", CSV_FIX)
    if not lines:
        raise InputError(path, "has a header but no points", CSV_FIX)
    index = [names.index(c) for c in ("x", "y", "height")]
    values = np.empty((len(lines), 3), dtype=np.float64)
    for k, (line, row) in enumerate(lines):
        if len(row) <= max(index):
            short = ", ".join(c for c, i in zip(("x", "y", "height"), index) if i >= len(row))
            raise InputError(path, f"line {line} has {len(row)} field(s) and lacks {short} (the header has "
                             f"{len(names)})", CSV_FIX)
        try:
            values[k] = [float(row[i]) for i in index]
        except ValueError:
            raise InputError(path, f"line {line} has a value that is not a number "
                             f"({', '.join(row[i].strip() for i in index)!r})", CSV_FIX) from None
    return values[:, 0], values[:, 1], values[:, 2]


@dataclass(frozen=True)
class PointHeights:
    """Reference heights at points: x, y in ``crs`` (None: the prediction's CRS), heights in metres.

    ``source`` names where they came from and ``crs_text`` how their CRS was given, for the
    messages (a CSV with --points-crs on the command line, a layer's own CRS in QGIS).
    """

    x: np.ndarray
    y: np.ndarray
    height: np.ndarray
    crs: Optional[str]
    source: str
    crs_text: str = ""
    crs_fix: str = POINTS_CRS_FIX  # what to do when none of them lies inside the prediction

    @classmethod
    def from_csv(cls, path: str | os.PathLike, crs: Optional[str] = None) -> "PointHeights":
        return cls(*read_csv_points(path), crs, str(path), f"--points-crs {crs}" if crs else "")


def read_points(points: PointHeights, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols) on ``grid`` and heights of reference points."""
    xs, ys, hs, crs = points.x, points.y, points.height, points.crs
    if crs:
        try:
            source = CRS.from_user_input(crs)
        except CRSError as exc:
            raise InputError(points.crs_text or crs, f"is not a CRS GDAL knows ({exc})",
                             "Give the CRS of the CSV's x,y as EPSG:code, e.g. EPSG:2154 or EPSG:4326") from None
        try:
            xs, ys = (np.asarray(v) for v in transform_points(source, grid.crs, xs, ys))
        except (CRSError, ValueError, *GDAL_ERRORS) as exc:
            raise InputError(points.source, f"has x,y that are not coordinates in {points.crs_text or crs} "
                             f"(GDAL: {exc})", POINTS_CRS_FIX) from None
    cols, rows_ = ~grid.transform * (xs, ys)
    ok = np.isfinite(cols) & np.isfinite(rows_)
    rows_i = np.where(ok, np.floor(np.where(ok, rows_, -1)), -1).astype(np.int64)
    cols_i = np.where(ok, np.floor(np.where(ok, cols, -1)), -1).astype(np.int64)
    inside = (rows_i >= 0) & (rows_i < grid.height) & (cols_i >= 0) & (cols_i < grid.width)
    if not inside.any():
        where = f"x {np.nanmin(xs):.10g}..{np.nanmax(xs):.10g}, y {np.nanmin(ys):.10g}..{np.nanmax(ys):.10g}" \
            if ok.any() else "no finite position"
        crs_text = points.crs_text if crs else f"the prediction's CRS ({grid.crs.to_string()}), the default"
        raise InputError(points.source, f"has none of its {len(xs)} point(s) inside the prediction (points at "
                         f"{where} in {grid.crs.to_string()}, read as {crs_text}; the prediction covers "
                         f"{_bounds_text(grid)})", points.crs_fix)
    return rows_i, cols_i, hs


def _bounds_text(grid: Grid) -> str:
    left, bottom, right, top = grid.bounds
    return f"x {left:.10g}..{right:.10g}, y {bottom:.10g}..{top:.10g}"


def _samples(predicted: str | os.PathLike, points: Optional[PointHeights], reference: Optional[str],
             window: Optional[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, reference) heights where both are known: at the points, or over the reference's window."""
    src, grid = read_height_grid(predicted)
    src.close()
    pred = read_height(predicted)
    if points is not None:
        rows, cols, heights = read_points(points, grid)
        inside = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
        p, r = pred[rows[inside], cols[inside]], heights[inside]
    else:
        w = Window(*window) if window else Window(0, 0, grid.width, grid.height)
        with ReferenceOnGrid(reference, grid) as ref:
            r = ref.read(w).ravel()
        p = pred[w.toslices()].ravel()
    ok = np.isfinite(p) & np.isfinite(r)
    if not ok.any():
        raise InputError(points.source if points is not None else reference, "has no height where the prediction "
                         "has data", "Give reference heights inside the predicted area")
    return p[ok].astype(np.float64), r[ok].astype(np.float64)


def correct_bias(predicted: str | os.PathLike, out_path: str | os.PathLike, *,
                 points: Optional[str | PointHeights] = None, points_crs: Optional[str] = None,
                 reference: Optional[str] = None, window: Optional[list[int]] = None, method: str = "auto",
                 check_reference: Optional[str] = None) -> BiasResult:
    """Fit a correction on the given reference heights and write the corrected raster.

    ``points`` is a CSV (x,y,height; its CRS ``points_crs``) or ``PointHeights``; otherwise
    ``reference`` is sampled, within ``window`` [col, row, width, height] when given.
    """
    check_choice(method, BIAS_METHODS, "method")
    out = check_output_path(out_path, predicted, reference or "", check_reference or "",
                            points if isinstance(points, (str, os.PathLike)) else "")
    if isinstance(points, (str, os.PathLike)):
        points = PointHeights.from_csv(points, points_crs)
    p, r = _samples(predicted, points, reference, window)
    correction, scores = choose_correction(p, r, method)
    source = points.source if points is not None else f"{reference} window {window or 'all'}"
    _write_corrected(predicted, out, correction, len(p), source)
    result = BiasResult(out, correction, len(p), scores,
                        on_samples={"before": height_metrics(p, r), "after": height_metrics(correction.apply(p), r)})
    if check_reference:
        result.on_check = {"before": compare_heights(predicted, check_reference)["overall"],
                           "after": compare_heights(out, check_reference)["overall"]}
    return result


def _write_corrected(predicted: str | os.PathLike, out: Path, correction: Correction, samples: int,
                     source: str) -> None:
    tags = {"PREDICTED": Path(predicted).name, "BIAS_SAMPLES": str(samples), "BIAS_SOURCE": str(source),
            "BIAS_CORRECTION": json.dumps({"method": correction.method, **correction.params})}
    map_height_raster(predicted, out, lambda values, _window: correction.apply(values.astype(np.float64)),
                      "predicted surface height, bias-corrected", tags=tags)
