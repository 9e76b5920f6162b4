"""Training scenes in memory and the patches drawn from them.

A scene is an aligned (embeddings, reference) pair plus its areas; its target is the
reference height, or the height above a coarse terrain raster when one is given
(so the network learns local relief, which transfers better to higher or lower ground).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from rasterio.windows import Window

from ..plugin.core.resample import ReferenceOnGrid
from ..plugin.core.dem import resolve_terrain
from ..plugin.core.errors import InputError
from .data import AlignedPair
from .splits import Areas, patch_origins, window_sums

BALANCE_BINS = 8
MIN_LABELLED = 0.5


@dataclass
class Scene:
    pair: AlignedPair
    areas: Areas
    target: np.ndarray          # height, or height above the coarse terrain (NaN = no label)
    label: np.ndarray           # pixels whose loss counts

    @property
    def embeddings(self) -> np.ndarray:
        return self.pair.embeddings


def make_scene(pair: AlignedPair, areas: Areas, terrain: Optional[str] = None) -> Scene:
    target = pair.reference
    if terrain:
        target = target - terrain_on_grid(terrain, pair)
    return Scene(pair, areas, target, pair.label_mask & np.isfinite(target))


def terrain_on_grid(path: str, pair: AlignedPair) -> np.ndarray:
    """The coarse terrain (a raster, or a DEM product fetched for the grid) on the pair's grid (NaN = no data)."""
    with ReferenceOnGrid(resolve_terrain(path, pair.grid), pair.grid) as terrain:
        return terrain.read(Window(0, 0, pair.grid.width, pair.grid.height))


class PatchSampler:
    """Draws training patches lying wholly in a train area and at least half labelled;
    with ``balance``, patches are weighted so every height range is drawn about as often."""

    def __init__(self, scenes: list[Scene], size: int, balance: bool) -> None:
        self.size = size
        origins, heights = [], []
        for k, scene in enumerate(scenes):
            found = patch_origins(scene.areas.train, size)
            labelled = window_sums(scene.label & scene.areas.train, size)
            keep = labelled[found[:, 0], found[:, 1]] >= MIN_LABELLED * size * size
            found = found[keep]
            total = window_sums(np.where(scene.label, scene.target, 0.0), size)
            heights.append(total[found[:, 0], found[:, 1]] / labelled[found[:, 0], found[:, 1]])
            origins.append(np.column_stack([np.full(len(found), k), found]))
        self.origins = np.concatenate(origins) if origins else np.zeros((0, 3), dtype=np.int64)
        if not len(self.origins):
            raise InputError(f"patch size {size}", "does not fit wholly inside any labelled part of the training "
                             "area", "Use a smaller --patch-size, larger blocks, a smaller buffer or a larger area")
        weights = _balanced(np.concatenate(heights)) if balance else np.ones(len(self.origins))
        self.cdf = np.cumsum(weights / weights.sum())

    def draw(self, rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
        """(scene, row, col) of ``count`` patches."""
        picks = np.minimum(np.searchsorted(self.cdf, rng.random(count), side="right"), len(self.cdf) - 1)
        return [tuple(int(v) for v in self.origins[i]) for i in picks]


def _balanced(heights: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights over equal-width bins of the patches' mean heights."""
    edges = np.linspace(heights.min(), heights.max() + 1e-6, BALANCE_BINS + 1)
    which = np.clip(np.digitize(heights, edges) - 1, 0, BALANCE_BINS - 1)
    counts = np.bincount(which, minlength=BALANCE_BINS)
    return 1.0 / counts[which]


def validation_origins(scenes: list[Scene], size: int) -> list[tuple[int, int, int]]:
    """A fixed grid of patches covering each validation area (inputs may reach past its
    edge; only validation pixels count in the loss)."""
    found = []
    for k, scene in enumerate(scenes):
        rows, cols = np.nonzero(scene.areas.validation & scene.label)
        if not rows.size:
            continue
        h, w = scene.label.shape
        for r in range(rows.min(), rows.max() + 1, size):
            for c in range(cols.min(), cols.max() + 1, size):
                r0, c0 = min(r, h - size), min(c, w - size)
                if (scene.areas.validation & scene.label)[r0:r0 + size, c0:c0 + size].any():
                    found.append((k, r0, c0))
    if not found:
        raise InputError("validation area", "has no labelled pixel", "Give a validation area the reference covers")
    return found


def batch(scenes: list[Scene], origins: list[tuple[int, int, int]], size: int, mean: float, std: float,
          area: str = "train"):
    """Tensors x (n, 64, s, s), normalised target y and loss mask m (labelled pixels of ``area``)."""
    import torch

    xs, ys, ms = [], [], []
    for k, r, c in origins:
        scene, sl = scenes[k], np.s_[r:r + size, c:c + size]
        xs.append(scene.embeddings[:, r:r + size, c:c + size])
        ms.append(scene.label[sl] & getattr(scene.areas, area)[sl])
        ys.append(np.where(ms[-1], (np.nan_to_num(scene.target[sl]) - mean) / std, 0.0))
    x = torch.from_numpy(np.nan_to_num(np.stack(xs), nan=0.0))
    return x, torch.from_numpy(np.stack(ys).astype(np.float32)), torch.from_numpy(np.stack(ms))
