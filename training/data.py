"""Aligned training data: embeddings and a reference DSM on one grid, and contiguous splits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from ..plugin.core.choices import DIRECTIONS, check_choice
from ..plugin.core.resample import ReferenceOnGrid
from ..plugin.core.errors import InputError
from ..plugin.core.rasters import EmbeddingRaster, Grid, valid_mask



@dataclass
class AlignedPair:
    """Embeddings (64, H, W; NaN = nodata) and reference heights (H, W; NaN = nodata) on one grid."""

    embeddings: np.ndarray
    reference: np.ndarray
    grid: Grid
    embeddings_path: str
    reference_path: str

    @property
    def label_mask(self) -> np.ndarray:
        """Pixels that may enter a loss: valid embeddings and a valid reference."""
        return valid_mask(self.embeddings) & np.isfinite(self.reference)


def load_pair(embeddings: str | os.PathLike, reference: str | os.PathLike) -> AlignedPair:
    """Read a whole (demo-sized) scene, resampling the reference onto the embedding grid."""
    with EmbeddingRaster(embeddings) as source:
        grid = source.grid
        whole = Window(0, 0, grid.width, grid.height)
        x = source.read(whole)
    with ReferenceOnGrid(reference, grid) as ref:
        y = ref.read(whole)
    return AlignedPair(x, y, grid, str(embeddings), str(reference))


@dataclass(frozen=True)
class Split:
    """Train, validation and test windows that never overlap."""

    train: Window
    validation: Window
    test: Window
    direction: str

    def as_dict(self) -> dict:
        def box(w: Window) -> list[int]:
            return [int(w.col_off), int(w.row_off), int(w.width), int(w.height)]
        return {"direction": self.direction, "train": box(self.train),
                "validation": box(self.validation), "test": box(self.test)}


def contiguous_split(width: int, height: int, test_fraction: float = 0.3, validation_fraction: float = 0.1,
                     direction: str = "east", min_size: int = 16) -> Split:
    """The paper's contiguous split: the test area is the ``direction`` side of the scene;
    validation is the strip of the training side next to it (for early stopping).

    A zero ``test_fraction`` leaves no test area (the user tests on a separate area), so
    every pixel but the validation strip trains."""
    check_choice(direction, DIRECTIONS, "split direction")
    if not (0 <= test_fraction < 1 and 0 <= validation_fraction < 1 and test_fraction + validation_fraction < 1):
        raise InputError(f"test fraction {test_fraction} / validation fraction {validation_fraction}",
                         "must be in [0, 1) each and sum to less than 1",
                         "Use e.g. 0.3 and 0.1 (a test fraction of 0 when you test on another area)")
    along = width if direction in ("east", "west") else height
    n_test = int(round(along * test_fraction))
    n_val = int(round(along * validation_fraction))
    n_train = along - n_test - n_val
    # a zero validation fraction means validation comes from elsewhere (a window or another pair)
    if min(n_test if test_fraction else min_size, n_train, n_val if validation_fraction else min_size) < min_size:
        raise InputError(f"scene of {width}x{height} px", f"is too small to split into train/validation/test "
                         f"strips of at least {min_size} px", "Use a larger area or other fractions")
    # offsets measured from the side opposite the test area
    spans = {"train": (0, n_train), "validation": (n_train, n_val), "test": (n_train + n_val, n_test)}
    windows = {}
    for name, (offset, size) in spans.items():
        if direction in ("west", "north"):
            offset = along - offset - size
        windows[name] = (Window(offset, 0, size, height) if direction in ("east", "west")
                         else Window(0, offset, width, size))
    return Split(windows["train"], windows["validation"], windows["test"], direction)
