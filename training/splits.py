"""Where a model may learn and where it is judged: train / validation / test areas as
pixel masks, with a buffer so no training patch touches the test area's surroundings.

Two layouts: the paper's contiguous strips (held-out side selectable) and spatial blocks
assigned at random (seeded). Masks rather than windows, because blocks are not
rectangles; a training patch is only ever drawn where it lies wholly inside the train
mask, so patches never straddle areas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..plugin.core.choices import SPLIT_KINDS, check_choice
from ..plugin.core.errors import InputError
from .data import contiguous_split



@dataclass
class SplitSpec:
    """How to split a scene; recorded in the model card so evaluation can repeat it."""

    kind: str = "contiguous"
    test_fraction: float = 0.3
    validation_fraction: float = 0.1
    direction: str = "east"
    block_size: int = 128
    buffer: int = 0
    seed: int = 0
    validation_window: Optional[list[int]] = None  # [col, row, width, height]; replaces the validation strip

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SplitSpec":
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass
class Areas:
    """Disjoint boolean masks (H, W) of one scene; pixels in none of them are buffer."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict:
        return {name: int(getattr(self, name).sum()) for name in ("train", "validation", "test")}


def window_sums(values: np.ndarray, size: int) -> np.ndarray:
    """Sum of every size x size window (integral image); shape (H - size + 1, W - size + 1)."""
    integral = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = values.astype(np.float64).cumsum(0).cumsum(1)
    return (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size]
            + integral[:-size, :-size])


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` pixels (square neighbourhood) of the mask."""
    if radius <= 0:
        return mask.copy()
    padded = np.pad(mask, radius)
    return window_sums(padded, 2 * radius + 1) > 0


def make_areas(spec: SplitSpec, height: int, width: int, separate_validation: bool = False) -> Areas:
    """Areas for one scene; with ``separate_validation`` (another pair validates) none is carved here."""
    _check(spec)
    fraction = 0.0 if separate_validation or spec.validation_window else spec.validation_fraction
    if spec.kind == "contiguous":
        split = contiguous_split(width, height, spec.test_fraction, fraction, spec.direction)
        masks = [_window_mask(height, width, w) for w in (split.train, split.validation, split.test)]
    else:
        masks = _blocks(spec, height, width, fraction)
    train, validation, test = masks
    if spec.validation_window and not separate_validation:
        validation = _window_mask(height, width, spec.validation_window)
        train, test = train & ~validation, test & ~validation
    return _buffered(train, validation, test, spec.buffer)


def _check(spec: SplitSpec) -> None:
    check_choice(spec.kind, SPLIT_KINDS, "split")
    if spec.buffer < 0:
        raise InputError(f"buffer {spec.buffer}", "must not be negative", "Give 0 or more pixels")
    if spec.kind == "blocks" and spec.block_size < 8:
        raise InputError(f"block size {spec.block_size}", "is too small", "Use blocks of at least the patch size")
    if spec.validation_window is not None and len(spec.validation_window) != 4:
        raise InputError(f"validation window {spec.validation_window}", "needs 4 numbers",
                         "Give col row width height in pixels")


def _window_mask(height: int, width: int, window) -> np.ndarray:
    if not hasattr(window, "toslices"):
        col, row, w, h = (int(v) for v in window)
        if w <= 0 or h <= 0 or col < 0 or row < 0 or col + w > width or row + h > height:
            raise InputError(f"validation window {list(window)}", f"is not inside the {width}x{height} px scene",
                             "Give col row width height within the embeddings raster")
        window = np.s_[row:row + h, col:col + w]
    else:
        window = window.toslices()
    mask = np.zeros((height, width), dtype=bool)
    mask[window] = True
    return mask


def _blocks(spec: SplitSpec, height: int, width: int, validation_fraction: float) -> list[np.ndarray]:
    """Square blocks dealt at random to test, validation and train (seeded)."""
    size = spec.block_size
    rows, cols = -(-height // size), -(-width // size)
    n = rows * cols
    n_test = max(1, int(round(n * spec.test_fraction)))
    n_val = max(1, int(round(n * validation_fraction))) if validation_fraction else 0
    if n - n_test - n_val < 1:
        raise InputError(f"block size {size}", f"gives only {n} blocks for a {width}x{height} px scene, too few "
                         "for train, validation and test", "Use smaller blocks or a larger area")
    label = np.zeros(n, dtype=np.int8)  # 0 train, 1 validation, 2 test
    order = np.random.default_rng(spec.seed).permutation(n)
    label[order[:n_test]] = 2
    label[order[n_test:n_test + n_val]] = 1
    grid = np.kron(label.reshape(rows, cols), np.ones((size, size), dtype=np.int8))[:height, :width]
    return [grid == k for k in (0, 1, 2)]


def _buffered(train: np.ndarray, validation: np.ndarray, test: np.ndarray, buffer: int) -> Areas:
    """Train keeps away from test and validation, validation from test, by ``buffer`` pixels."""
    near_test = dilate(test, buffer)
    train = train & ~near_test & ~dilate(validation, buffer)
    return Areas(train, validation & ~near_test, test)


def patch_origins(allowed: np.ndarray, size: int) -> np.ndarray:
    """(row, col) of every size x size patch lying wholly inside ``allowed``; (n, 2) int array."""
    if allowed.shape[0] < size or allowed.shape[1] < size:
        return np.zeros((0, 2), dtype=np.int64)
    full = window_sums(allowed, size) >= size * size - 0.5
    return np.argwhere(full)
