"""Accuracy figures for predicted vs reference heights (all differences are prediction − reference)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

METRIC_NAMES = ("n", "r2", "rmse", "mae", "mean_diff", "median_diff", "nmad", "pearson", "spearman", "le90")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    average = np.cumsum(counts) - (counts - 1) / 2.0
    return average[inverse.reshape(-1)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def height_metrics(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """n, R², RMSE, MAE, bias (mean diff), median diff, NMAD, Pearson, Spearman, LE90.

    Pixels where either value is not finite are left out. R² is 1 − SSE/SST about the
    reference mean, so a biased prediction scores lower than its correlation suggests.
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    keep = np.isfinite(p) & np.isfinite(r)
    p, r = p[keep], r[keep]
    n = int(p.size)
    if n == 0:
        return {"n": 0, **{k: float("nan") for k in METRIC_NAMES[1:]}}
    d = p - r
    median = float(np.median(d))
    sst = float(((r - r.mean()) ** 2).sum())
    return {
        "n": n,
        "r2": 1.0 - float((d * d).sum()) / sst if sst > 0 else float("nan"),
        "rmse": math.sqrt(float((d * d).mean())),
        "mae": float(np.abs(d).mean()),
        "mean_diff": float(d.mean()),
        "median_diff": median,
        "nmad": 1.4826 * float(np.median(np.abs(d - median))),
        "pearson": _pearson(p, r) if n > 1 else float("nan"),
        "spearman": _pearson(_ranks(p), _ranks(r)) if n > 1 else float("nan"),
        "le90": float(np.percentile(np.abs(d), 90)),
    }


def nice_bin_edges(reference: np.ndarray, target_bins: int = 8) -> np.ndarray:
    """Round-numbered bin edges (1/2/5 × 10^k metres) spanning the reference heights."""
    r = np.asarray(reference, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = float(r.min()), float(r.max())
    raw = max((hi - lo) / target_bins, 1e-6)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    stop = math.floor(hi / step) * step + step
    return np.arange(start, stop + step / 2, step)


def binned_metrics(predicted: np.ndarray, reference: np.ndarray,
                   edges: Optional[Sequence[float]] = None) -> list[dict]:
    """The same metrics per reference-height bin [lo, hi); shows bias that varies with height."""
    p = np.asarray(predicted, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    edges = np.asarray(nice_bin_edges(r) if edges is None else edges, dtype=np.float64)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (r >= lo) & (r < hi)
        if inside.any():
            rows.append({"bin_min": float(lo), "bin_max": float(hi), **height_metrics(p[inside], r[inside])})
    return rows


def format_metrics_table(rows: dict[str, dict], names: Sequence[str] = ("n", "r2", "rmse", "mae", "mean_diff",
                                                                     "median_diff", "nmad", "le90")) -> str:
    """A plain-text table, one row per named metrics dict."""
    width = max(len(k) for k in rows) if rows else 4
    header = f"{'':<{width}}" + "".join(f"{n:>12}" for n in names)
    lines = [header]
    for label, m in rows.items():
        cells = "".join(f"{m[n]:>12d}" if n == "n" else f"{m[n]:>12.3f}" for n in names)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def json_safe(value):
    """NaN/inf -> None, recursively, so metrics files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_markdown_table(rows: dict[str, dict], names: Sequence[str] = ("n", "r2", "rmse", "mae", "median_diff",
                                                                        "nmad", "le90")) -> str:
    """The same figures as a Markdown table (for reports and the README); missing values show as —."""
    def cell(m: dict, n: str) -> str:
        value = m.get(n)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "—"
        return f"{value:d}" if n == "n" else f"{value:.3f}"

    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(m, n) for n in names) + " |" for label, m in rows.items()]
    return "\n".join(lines)
