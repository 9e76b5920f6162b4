"""Training scenes read by windows, and the patches drawn from them.

A scene is an aligned (embeddings, reference) pair on the embeddings' grid plus its areas;
its target is the reference height, or the height above a coarse terrain raster when one
is given (so the network learns local relief, which transfers better to higher or lower
ground). Nothing of a scene is held at full resolution: one pass over it in tiles builds
coarse per-cell sums (CELL-aligned cells of the label, train and validation masks and of
the target), from which patch origins, balancing weights and the normalisation follow;
patches are then read by windows, in DataLoader workers that each open their own rasters.
Memory depends on the batch, the patch size and the workers, not on the area.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from rasterio.windows import Window

from ..plugin.core.dem import resolve_terrain
from ..plugin.core.errors import InputError
from ..plugin.core.rasters import EmbeddingRaster, Grid, valid_mask
from ..plugin.core.resample import ReferenceOnGrid
from .splits import AreaLayout, window_sums

BALANCE_BINS = 8
MIN_LABELLED = 0.5
SCAN_TILE = 256  # side of the tiles of the one pass over a scene (64 bands x 256² float32 = 16 MB)
# GDAL's block cache while training and evaluating read by windows. Its default, 5 % of the
# RAM, fills with the blocks of a large scene as patches are read at random: 1.2 GB of a
# 4096² pair on a 24 GB machine, the whole of its growth with the area. Random patches
# rarely meet a cached block again, and the scans read each block once.
READ_GDAL_CACHE = 64 * 2**20


def bounded_cache():
    """A rasterio environment capping GDAL's block cache (restored after; forked reading
    workers inherit the cap)."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=READ_GDAL_CACHE)


@dataclass
class Scene:
    """One pair: where to read it, its areas, and coarse per-cell sums over it (cells of ``cell`` px)."""

    embeddings_path: str
    reference_path: str
    terrain_path: Optional[str]     # resolved terrain raster (a DEM product already fetched), or None
    grid: Grid
    layout: AreaLayout
    cell: int
    train_cells: np.ndarray         # (rows, cols) bool: the cell lies wholly in the train area
    labelled: np.ndarray            # labelled train pixels a cell
    target_sum: np.ndarray          # sum of the target over them
    validation_cells: np.ndarray    # the cell holds a labelled validation pixel
    pixels: dict                    # pixels in each area (the card's split record)
    sums: tuple[float, float, float]  # count, sum, sum of squares of the target over labelled train pixels


def cell_for(patch_size: int) -> int:
    """The coarse cell side: the largest of 16, 8, 4, 2, 1 dividing the patch size, so
    cell-aligned patches cover whole cells."""
    return next(c for c in (16, 8, 4, 2, 1) if patch_size % c == 0)


def make_scene(embeddings: str, reference: str, layout: AreaLayout, terrain: Optional[str], cell: int) -> Scene:
    """Scan a pair once, tile by tile, into a Scene (the terrain is resolved, or fetched, here)."""
    with EmbeddingRaster(embeddings) as source:
        grid = source.grid
    if (grid.height, grid.width) != (layout.height, layout.width):
        raise ValueError("the layout is not the embeddings' grid")
    terrain_path = str(resolve_terrain(terrain, grid)) if terrain else None
    rows, cols = -(-grid.height // cell), -(-grid.width // cell)
    train_cells = np.zeros((rows, cols), dtype=bool)
    labelled = np.zeros((rows, cols), dtype=np.int32)
    target_sum = np.zeros((rows, cols), dtype=np.float64)
    validation_cells = np.zeros((rows, cols), dtype=bool)
    pixels = {"train": 0, "validation": 0, "test": 0}
    count, total, squares = 0, 0.0, 0.0
    with PairReader(embeddings, reference, terrain_path, grid) as reader:
        for row in range(0, grid.height, SCAN_TILE):
            for col in range(0, grid.width, SCAN_TILE):
                h, w = min(SCAN_TILE, grid.height - row), min(SCAN_TILE, grid.width - col)
                target, label = reader.read(row, col, h, w)[1:]
                areas = layout.areas(row, col, h, w)
                for name in pixels:
                    pixels[name] += int(getattr(areas, name).sum())
                train = label & areas.train
                values = np.where(train, target, 0.0).astype(np.float64)
                count, total, squares = count + int(train.sum()), total + values.sum(), squares + (values ** 2).sum()
                cells = np.s_[row // cell:row // cell + -(-h // cell), col // cell:col // cell + -(-w // cell)]
                train_cells[cells] = _cell_sums(areas.train, cell) == cell * cell
                labelled[cells] = _cell_sums(train, cell)
                target_sum[cells] = _cell_sums(values, cell)
                validation_cells[cells] = _cell_sums(label & areas.validation, cell) > 0
    return Scene(str(embeddings), str(reference), terrain_path, grid, layout, cell, train_cells, labelled,
                 target_sum, validation_cells, pixels, (count, total, squares))


def _cell_sums(values: np.ndarray, cell: int) -> np.ndarray:
    """Sums over cell x cell blocks (the ragged edge padded with zeros)."""
    h, w = values.shape
    padded = np.zeros((-(-h // cell) * cell, -(-w // cell) * cell), dtype=np.float64)
    padded[:h, :w] = values
    return padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).sum(axis=(1, 3))


class PairReader:
    """Embeddings, target and label of any window of a pair (the open rasters belong to one process)."""

    def __init__(self, embeddings: str, reference: str, terrain: Optional[str], grid: Grid) -> None:
        self.embeddings = EmbeddingRaster(embeddings)
        self.reference = ReferenceOnGrid(reference, grid)
        self.terrain = ReferenceOnGrid(terrain, grid) if terrain else None

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (64, h, w; NaN = nodata), target (h, w; NaN = no label) and label (pixels whose loss may count)."""
        window = Window(col, row, width, height)
        x = self.embeddings.read(window)
        target = self.reference.read(window)
        if self.terrain is not None:
            target = target - self.terrain.read(window)
        return x, target, valid_mask(x) & np.isfinite(target)

    def close(self) -> None:
        for source in (self.embeddings, self.reference, self.terrain):
            if source is not None:
                source.close()

    def __enter__(self) -> "PairReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def target_statistics(scenes: list[Scene]) -> tuple[float, float]:
    """Mean and std of the target over labelled training pixels (the default normalisation)."""
    count = sum(s.sums[0] for s in scenes)
    if not count:
        raise InputError(scenes[0].reference_path, "has no valid pixel in the training area",
                         "Check its nodata and that it covers the embeddings")
    mean = sum(s.sums[1] for s in scenes) / count
    variance = max(sum(s.sums[2] for s in scenes) / count - mean * mean, 0.0)
    return float(mean), math.sqrt(variance) or 1.0


class PatchSampler:
    """Draws training patches lying wholly in a train area and at least half labelled, their
    origins on the scene's cell lattice; with ``balance``, patches are weighted so every
    height range is drawn about as often."""

    def __init__(self, scenes: list[Scene], size: int, balance: bool) -> None:
        self.size = size
        origins, heights = [], []
        for k, scene in enumerate(scenes):
            span = size // scene.cell
            if scene.train_cells.shape[0] < span or scene.train_cells.shape[1] < span:
                continue
            inside = window_sums(scene.train_cells, span) >= span * span - 0.5
            labelled = window_sums(scene.labelled, span)
            found = np.argwhere(inside & (labelled >= MIN_LABELLED * size * size))
            found = found[(found[:, 0] * scene.cell + size <= scene.grid.height)
                          & (found[:, 1] * scene.cell + size <= scene.grid.width)]
            total = window_sums(scene.target_sum, span)
            heights.append(total[found[:, 0], found[:, 1]] / labelled[found[:, 0], found[:, 1]])
            origins.append(np.column_stack([np.full(len(found), k), found * scene.cell]))
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
    """A fixed grid of patches covering each validation area's bounding box (inputs may reach
    past its edge; only validation pixels count in the loss)."""
    found = []
    for k, scene in enumerate(scenes):
        rows, cols = np.nonzero(scene.validation_cells)
        if not rows.size:
            continue
        h, w, cell = scene.grid.height, scene.grid.width, scene.cell
        for r in range(rows.min() * cell, (rows.max() + 1) * cell, size):
            for c in range(cols.min() * cell, (cols.max() + 1) * cell, size):
                r0, c0 = max(0, min(r, h - size)), max(0, min(c, w - size))
                if scene.validation_cells[r0 // cell:-(-(r0 + size) // cell), c0 // cell:-(-(c0 + size) // cell)].any():
                    found.append((k, r0, c0))
    if not found:
        raise InputError("validation area", "has no labelled pixel", "Give a validation area the reference covers")
    return found


class PatchDataset:
    """Map-style dataset of patches keyed by (scene, row, col, area): x (64, s, s), the normalised
    target y and the loss mask m (labelled pixels of the area). Rasters are opened lazily in
    each process (DataLoader workers must not share GDAL handles)."""

    def __init__(self, scenes: list[Scene], size: int, mean: float, std: float) -> None:
        self.scenes, self.size, self.mean, self.std = scenes, size, mean, std
        self._readers: dict[int, PairReader] = {}
        self._pid = os.getpid()

    def _reader(self, k: int) -> PairReader:
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours
            self._readers, self._pid = {}, os.getpid()
        if k not in self._readers:
            s = self.scenes[k]
            self._readers[k] = PairReader(s.embeddings_path, s.reference_path, s.terrain_path, s.grid)
        return self._readers[k]

    def __getitem__(self, key: tuple[int, int, int, str]):
        import torch

        k, r, c, area = key
        x, target, label = self._reader(k).read(r, c, self.size, self.size)
        mask = label & getattr(self.scenes[k].layout.areas(r, c, self.size, self.size), area)
        y = np.where(mask, (np.nan_to_num(target) - self.mean) / self.std, 0.0).astype(np.float32)
        return torch.from_numpy(np.nan_to_num(x, nan=0.0)), torch.from_numpy(y), torch.from_numpy(mask)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __getstate__(self) -> dict:  # spawned workers start without the parent's open rasters
        return {**self.__dict__, "_readers": {}}


class Batches:
    """The DataLoader's batch sampler: it yields whatever list of keyed batches it was last given
    (the origins are drawn in the main process, so the run does not depend on the workers)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def patch_loader(dataset: PatchDataset, batches: Batches, workers: int):
    """A DataLoader reading the ``batches`` keys with ``workers`` processes (0: in this process)."""
    import torch

    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=workers > 0, prefetch_factor=2 if workers else None)

