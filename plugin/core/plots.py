"""PNG pictures of height and difference maps (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .rasters import read_height

MAX_SIDE = 1200  # maps are decimated on read so neither side exceeds this


def _limits(values: np.ndarray, symmetric: bool) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        bound = float(np.percentile(np.abs(finite), 98)) or 1.0
        return -bound, bound
    return float(np.percentile(finite, 2)), float(np.percentile(finite, 98))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_accuracy_plots(predicted: np.ndarray, reference: np.ndarray, prefix: str, metrics: dict) -> list[str]:
    """Predicted-vs-reference 2-D histogram and histogram of differences, as two PNGs.

    The pixels may be a sample; the figures written on the plots come from ``metrics``
    (``height_metrics`` of all the pixels), so they match metrics.json and the dock.
    """
    plt = _pyplot()
    scatter, histogram = f"{prefix}_scatter.png", f"{prefix}_histogram.png"
    lo = float(min(predicted.min(), reference.min()))
    hi = float(max(predicted.max(), reference.max()))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    counts = ax.hist2d(reference, predicted, bins=120, range=[[lo, hi], [lo, hi]], cmin=1, cmap="viridis")[3]
    ax.plot([lo, hi], [lo, hi], "r--", lw=1, label="1:1")
    ax.set_xlabel("Reference height (m)")
    ax.set_ylabel("Predicted height (m)")
    ax.set_title("Predicted vs reference")
    ax.legend(loc="upper left")
    fig.colorbar(counts, ax=ax, label="pixels")
    fig.tight_layout()
    fig.savefig(scatter, dpi=100)
    plt.close(fig)

    diff = predicted - reference
    bound = float(np.percentile(np.abs(diff), 99)) or 1.0
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.hist(diff, bins=100, range=(-bound, bound), color="#4477aa")
    ax.axvline(0, color="k", lw=1)
    median = float(metrics["median_diff"])
    ax.axvline(median, color="r", ls="--", lw=1, label=f"median {median:+.2f} m")
    ax.set_xlabel("Predicted − reference (m)")
    ax.set_ylabel("pixels")
    ax.set_title("Differences")
    ax.legend()
    fig.tight_layout()
    fig.savefig(histogram, dpi=100)
    plt.close(fig)
    return [scatter, histogram]


def render_maps(out_png: str | os.PathLike, predicted: str | os.PathLike,
                difference: Optional[str | os.PathLike] = None, reference_on_grid: Optional[np.ndarray] = None,
                split_fraction: Optional[float] = None, title: str = "",
                outline: Optional[np.ndarray] = None) -> None:
    """Side-by-side maps: [reference], predicted height, [difference]; a dashed line marks a split,
    or ``outline`` (a boolean mask on the raster's grid, e.g. the test area) is drawn dashed."""
    plt = _pyplot()
    panels = []
    pred = read_height(predicted, MAX_SIDE)
    lo, hi = _limits(pred if reference_on_grid is None else reference_on_grid, False)
    if reference_on_grid is not None:
        panels.append(("Reference DSM (m)", reference_on_grid, "terrain", lo, hi))
    panels.append(("Predicted height (m)", pred, "terrain", lo, hi))
    if difference is not None:
        diff = read_height(difference, MAX_SIDE)
        dlo, dhi = _limits(diff, True)
        panels.append(("Predicted − reference (m)", diff, "RdBu_r", dlo, dhi))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    for ax, (label, values, cmap, vmin, vmax) in zip(axes[0], panels):
        colours = plt.get_cmap(cmap).copy()
        colours.set_bad("#b0b0b0")  # nodata: grey, distinct from the ramps' white
        image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        if split_fraction is not None:
            ax.axvline(split_fraction * values.shape[1] - 0.5, color="k", ls="--", lw=1)
        if outline is not None and outline.any() and not outline.all():
            ax.contour(_resize_nearest(outline, values.shape).astype(float), levels=[0.5], colors="k",
                       linestyles="--", linewidths=1)
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A full-resolution mask brought to a preview's shape."""
    rows = (np.arange(shape[0]) * mask.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * mask.shape[1] / shape[1]).astype(int)
    return mask[np.ix_(rows, cols)]


ERROR_BY_BIN_SIZE = (6.4, 4.0)  # inches at 100 dpi


def render_error_by_bin(series: dict[str, list[dict]], out_png: str | os.PathLike, title: str = "") -> None:
    """Median difference (bias) and RMSE per reference-height bin, one line per labelled
    series of ``binned_metrics`` rows: shows whether low ground is over- and high ground
    under-predicted, the paper's failure under distribution shift."""
    plt = _pyplot()
    fig, (bias, rmse) = plt.subplots(1, 2, figsize=ERROR_BY_BIN_SIZE)
    for label, rows in series.items():
        centres = [(r["bin_min"] + r["bin_max"]) / 2 for r in rows]
        bias.plot(centres, [r["median_diff"] for r in rows], marker="o", ms=3, label=label)
        rmse.plot(centres, [r["rmse"] for r in rows], marker="o", ms=3, label=label)
    bias.axhline(0, color="k", lw=0.8)
    bias.set_ylabel("median predicted − reference (m)")
    rmse.set_ylabel("RMSE (m)")
    for ax in (bias, rmse):
        ax.set_xlabel("reference height (m)")
    rmse.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
