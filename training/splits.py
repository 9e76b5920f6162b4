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


class AreaLayout:
    """The areas of one scene, computable for any window, so a scene of any size never needs
    full-size masks (training reads patches by windows). ``areas(window)`` equals the same
    window of the whole scene's masks: buffers are computed on the window grown by the buffer.

    ``role`` "validation" is a separate validation pair: all of it validates.
    """

    def __init__(self, spec: SplitSpec, height: int, width: int, separate_validation: bool = False,
                 role: str = "split") -> None:
        _check(spec)
        self.spec, self.height, self.width, self.role = spec, height, width, role
        fraction = 0.0 if separate_validation or spec.validation_window else spec.validation_fraction
        self.override = spec.validation_window if spec.validation_window and not separate_validation else None
        if self.override:
            _check_window(height, width, self.override)
        self.rects: Optional[list] = None
        self.labels: Optional[np.ndarray] = None
        if role == "validation":
            return
        if spec.kind == "contiguous":
            split = contiguous_split(width, height, spec.test_fraction, fraction, spec.direction)
            self.rects = [split.train, split.validation, split.test]
        else:
            self.labels = _block_labels(spec, height, width, fraction)

    def areas(self, row: int = 0, col: int = 0, height: Optional[int] = None, width: Optional[int] = None) -> Areas:
        """Areas of the window (row, col, height, width), by default the whole scene; parts of the
        window outside the scene belong to no area."""
        height = self.height - row if height is None else height
        width = self.width - col if width is None else width
        pad = self.spec.buffer
        r0, c0 = max(0, row - pad), max(0, col - pad)
        r1, c1 = min(self.height, row + height + pad), min(self.width, col + width + pad)
        shape = (max(r1 - r0, 0), max(c1 - c0, 0))
        if self.role == "validation":
            masks = [np.zeros(shape, bool), np.ones(shape, bool), np.zeros(shape, bool)]
        elif self.rects is not None:
            masks = [_rect_mask(r0, c0, shape, w) for w in self.rects]
        else:
            size = self.spec.block_size
            grid = self.labels[np.arange(r0, r1)[:, None] // size, np.arange(c0, c1)[None, :] // size]
            masks = [grid == k for k in (0, 1, 2)]
        train, validation, test = masks
        if self.override:
            validation = _rect_mask(r0, c0, shape, self.override)
            train, test = train & ~validation, test & ~validation
        if self.role != "validation":
            buffered = _buffered(train, validation, test, pad)
            train, validation, test = buffered.train, buffered.validation, buffered.test
        out = []
        for mask in (train, validation, test):  # crop the padding, place in the (possibly overhanging) window
            window = np.zeros((height, width), dtype=bool)
            rs, cs = max(row, 0), max(col, 0)
            re, ce = min(row + height, self.height), min(col + width, self.width)
            if re > rs and ce > cs:
                window[rs - row:re - row, cs - col:ce - col] = mask[rs - r0:re - r0, cs - c0:ce - c0]
            out.append(window)
        return Areas(*out)


def make_areas(spec: SplitSpec, height: int, width: int, separate_validation: bool = False) -> Areas:
    """Areas for one whole scene; with ``separate_validation`` (another pair validates) none is carved here."""
    return AreaLayout(spec, height, width, separate_validation).areas()


def _check(spec: SplitSpec) -> None:
    check_choice(spec.kind, SPLIT_KINDS, "split")
    if spec.buffer < 0:
        raise InputError(f"buffer {spec.buffer}", "must not be negative", "Give 0 or more pixels")
    if spec.kind == "blocks" and spec.block_size < 8:
        raise InputError(f"block size {spec.block_size}", "is too small", "Use blocks of at least the patch size")
    if spec.validation_window is not None and len(spec.validation_window) != 4:
        raise InputError(f"validation window {spec.validation_window}", "needs 4 numbers",
                         "Give col row width height in pixels")


def _check_window(height: int, width: int, window) -> None:
    col, row, w, h = (int(v) for v in window)
    if w <= 0 or h <= 0 or col < 0 or row < 0 or col + w > width or row + h > height:
        raise InputError(f"validation window {list(window)}", f"is not inside the {width}x{height} px scene",
                         "Give col row width height within the embeddings raster")


def _rect_mask(row: int, col: int, shape: tuple[int, int], rect) -> np.ndarray:
    """A rectangle (a rasterio Window or [col, row, width, height]) on the grid of shape ``shape`` at (row, col)."""
    if hasattr(rect, "col_off"):
        rect = (rect.col_off, rect.row_off, rect.width, rect.height)
    c, r, w, h = (int(v) for v in rect)
    mask = np.zeros(shape, dtype=bool)
    mask[max(r - row, 0):max(r + h - row, 0), max(c - col, 0):max(c + w - col, 0)] = True
    return mask


def _block_labels(spec: SplitSpec, height: int, width: int, validation_fraction: float) -> np.ndarray:
    """Square blocks dealt at random to test (2), validation (1) and train (0), seeded; one value a block."""
    size = spec.block_size
    rows, cols = -(-height // size), -(-width // size)
    n = rows * cols
    n_test = max(1, int(round(n * spec.test_fraction))) if spec.test_fraction else 0
    n_val = max(1, int(round(n * validation_fraction))) if validation_fraction else 0
    if n - n_test - n_val < 1:
        raise InputError(f"block size {size}", f"gives only {n} blocks for a {width}x{height} px scene, too few "
                         "for train, validation and test", "Use smaller blocks or a larger area")
    label = np.zeros(n, dtype=np.int8)  # 0 train, 1 validation, 2 test
    order = np.random.default_rng(spec.seed).permutation(n)
    label[order[:n_test]] = 2
    label[order[n_test:n_test + n_val]] = 1
    return label.reshape(rows, cols)


def _buffered(train: np.ndarray, validation: np.ndarray, test: np.ndarray, buffer: int) -> Areas:
    """Train keeps away from test and validation, validation from test, by ``buffer`` pixels."""
    near_test = dilate(test, buffer)
    train = train & ~near_test & ~dilate(validation, buffer)
    return Areas(train, validation & ~near_test, test)
