"""PNG pictures of height and difference maps (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .rasters import open_raster

MAX_SIDE = 1200


def read_preview(path: str | os.PathLike) -> np.ndarray:
    """Band 1 as float with NaN for nodata, decimated so neither side exceeds MAX_SIDE."""
    with open_raster(path) as src:
        scale = max(src.width, src.height) / MAX_SIDE
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale))) if scale > 1 else None
        data = src.read(1, masked=True, out_shape=shape)
        values = data.astype(np.float32).filled(np.nan)
        if src.transform.e > 0:
            values = values[::-1]
        return values


def _limits(values: np.ndarray, symmetric: bool) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        bound = float(np.percentile(np.abs(finite), 98)) or 1.0
        return -bound, bound
    return float(np.percentile(finite, 2)), float(np.percentile(finite, 98))


def render_maps(out_png: str | os.PathLike, predicted: str | os.PathLike,
                difference: Optional[str | os.PathLike] = None, reference_on_grid: Optional[np.ndarray] = None,
                split_fraction: Optional[float] = None, title: str = "") -> None:
    """Side-by-side maps: [reference], predicted height, [difference]; a dashed line marks a split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    pred = read_preview(predicted)
    lo, hi = _limits(pred if reference_on_grid is None else reference_on_grid, False)
    if reference_on_grid is not None:
        panels.append(("Reference DSM (m)", reference_on_grid, "terrain", lo, hi))
    panels.append(("Predicted height (m)", pred, "terrain", lo, hi))
    if difference is not None:
        diff = read_preview(difference)
        dlo, dhi = _limits(diff, True)
        panels.append(("Predicted − reference (m)", diff, "RdBu_r", dlo, dhi))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    for ax, (label, values, cmap, vmin, vmax) in zip(axes[0], panels):
        shown = np.ma.masked_invalid(values)
        image = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if split_fraction is not None:
            ax.axvline(split_fraction * values.shape[1] - 0.5, color="k", ls="--", lw=1)
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
