"""Calibrated uncertainty: a scale k so that prediction ± k x (TTA spread) is a 90 % interval.

The spread of the model's heights over flips and rotations (core.uncertainty) ranks
pixels by how unsure the model is, but is not itself an error size (on the demo scene
the median spread is ~5 m where the median error is ~12 m). The scale k is the 90th
percentile of |prediction - reference| / spread over the validation area (the area early
stopping already uses, never the test area), recorded in the model card
(``uncertainty``) and checked by ``evaluate --uncertainty`` as the share of pixels of
each area whose reference falls inside the interval (its coverage).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from affine import Affine

from ..plugin.core.inference import predict_height
from ..plugin.core.models import ModelPackage
from ..plugin.core.rasters import EmbeddingRaster, Grid, crop_to_grid, make_partial_dir, read_height
from ..plugin.core.uncertainty import predict_uncertainty
from .patches import SCAN_TILE, PairReader, Scene
from .splits import Areas

LEVEL = 0.9
MIN_SPREAD = 1e-3  # m: a spread of zero would need an infinite scale
CONTEXT = 64       # px of embeddings around the validation area (as predictions use)


def scale_for(errors: np.ndarray, spread: np.ndarray, level: float = LEVEL) -> float:
    """k such that |error| <= k x spread on ``level`` of the pixels."""
    ratio = np.abs(errors) / np.maximum(spread, MIN_SPREAD)
    ratio = ratio[np.isfinite(ratio)]
    return float(np.quantile(ratio, level)) if ratio.size else float("nan")


def coverage(errors: np.ndarray, spread: np.ndarray, k: float) -> float:
    """Share of pixels whose reference lies within prediction ± k x spread."""
    ok = np.isfinite(errors) & np.isfinite(spread)
    return float(np.mean(np.abs(errors[ok]) <= k * np.maximum(spread[ok], MIN_SPREAD))) if ok.any() else float("nan")


def _on_tile_lattice(lo: int, hi: int, length: int, tile: int, stride: int) -> tuple[int, int]:
    """[start, end) around [lo, hi) plus CONTEXT whose prediction tiles are those of the whole raster.

    Tiles start at multiples of the stride from the raster's edge (the last one flush
    with the far edge), so a crop starting on that lattice and ending a whole number of
    strides after its first tile, or at the raster's end, is cut into the same tiles: the
    prediction and spread there are the whole raster's (a crop cut elsewhere changes them:
    ~2 m median on the demo scene, and a spread smaller by an eighth).
    """
    if length <= tile:
        return 0, length
    start = max(0, (lo - CONTEXT) // stride * stride)
    end = start + tile
    while end < min(length, hi + CONTEXT):
        end += stride
    if end > length - tile:  # near the far edge: the whole raster's flush tile must be in too
        end = length
    return start, end


def _validation_on(scene: Scene, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Target and labelled-validation mask of a window of the scene, read tile by tile (2-D arrays only)."""
    target = np.full((height, width), np.nan, dtype=np.float32)
    validation = np.zeros((height, width), dtype=bool)
    with PairReader(scene.embeddings_path, scene.reference_path, scene.terrain_path, scene.grid) as reader:
        for r in range(0, height, SCAN_TILE):
            for c in range(0, width, SCAN_TILE):
                h, w = min(SCAN_TILE, height - r), min(SCAN_TILE, width - c)
                _, values, label = reader.read(row + r, col + c, h, w)
                target[r:r + h, c:c + w] = values
                validation[r:r + h, c:c + w] = label & scene.layout.areas(row + r, col + c, h, w).validation
    return target, validation


def calibrate_on_validation(package: ModelPackage, scene: Scene, device: str = "auto",
                            workdir: Optional[Path] = None, log: Callable[[str], None] = print) -> dict:
    """The card's ``uncertainty`` entry: k from the validation area of a training scene.

    The scene's target is what the network predicts (height, or height above the coarse
    terrain for terrain-relative models, where the terrain cancels out of the error). Only
    the validation area's bounding box, plus CONTEXT px, is predicted (8 passes a tile).
    """
    rows, cols = np.nonzero(scene.validation_cells)
    if not rows.size:
        return {}
    grid, cell = scene.grid, scene.cell
    c0, r0 = int(cols.min()) * cell, int(rows.min()) * cell
    c1, r1 = min(grid.width, (int(cols.max()) + 1) * cell), min(grid.height, (int(rows.max()) + 1) * cell)
    tile = int(package.default("tile", 256))
    stride = max(1, tile - int(package.default("overlap", tile // 4)))
    oc, c_end = _on_tile_lattice(c0, c1, grid.width, tile, stride)
    orow, r_end = _on_tile_lattice(r0, r1, grid.height, tile, stride)
    outer = Grid(grid.crs, grid.transform * Affine.translation(oc, orow), c_end - oc, r_end - orow)
    scratch = make_partial_dir((workdir or Path(scene.embeddings_path).parent) / "calibration")
    try:
        cropped = scratch / "embeddings.tif"
        crop_to_grid(scene.embeddings_path, cropped, outer)
        predict_height(cropped, package, scratch / "prediction.tif", relative=True, device=device)
        predict_uncertainty(cropped, package, scratch / "spread.tif", device=device)
        pred, spread = (read_height(scratch / name) for name in ("prediction.tif", "spread.tif"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    target, validation = _validation_on(scene, orow, oc, outer.height, outer.width)
    errors = np.where(validation & np.isfinite(target), pred - target, np.nan)
    if not np.isfinite(errors).any():
        return {}
    k = scale_for(errors[np.isfinite(errors)], spread[np.isfinite(errors)])
    result = {"method": "test-time augmentation spread x k", "level": LEVEL, "k": k,
              "calibrated_on": "validation area", "pixels": int(np.isfinite(errors).sum()),
              "validation_coverage": coverage(errors, spread, k),
              "median_spread_m": float(np.nanmedian(np.where(np.isfinite(errors), spread, np.nan)))}
    log(f"uncertainty calibrated on the validation area: prediction ± {k:.2f} x spread is a "
        f"{LEVEL:.0%} interval ({result['pixels']} px)")
    return result


def interval_report(card: dict, pred: np.ndarray, spread: np.ndarray, reference: np.ndarray, areas: Areas,
                    valid: np.ndarray) -> dict:
    """Coverage of prediction ± k x spread per area: k from the card, else from this validation area."""
    errors = pred - reference
    recorded = card.get("uncertainty", {}) if isinstance(card.get("uncertainty"), dict) else {}
    k, source = recorded.get("k"), "model card (its training run's validation area)"
    if not isinstance(k, (int, float)) or not np.isfinite(k) or k <= 0:
        mask = areas.validation & valid & np.isfinite(spread)
        k, source = scale_for(errors[mask], spread[mask]), "this report's validation area (the card has none)"
    out = {"level": LEVEL, "k": float(k), "k_from": source, "coverage": {}, "median_half_width_m": {}}
    for name in ("train", "validation", "test"):
        mask = getattr(areas, name) & valid & np.isfinite(spread)
        if mask.any():
            out["coverage"][name] = coverage(errors[mask], spread[mask], k)
            out["median_half_width_m"][name] = float(np.median(k * np.maximum(spread[mask], MIN_SPREAD)))
    return out


def calibrate_model(model_dir: str | Path, embeddings: str, reference: str, terrain: Optional[str] = None,
                    device: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Add the ``uncertainty`` calibration to an existing model folder's card (a model trained
    before calibration existed), on the validation area of the split its card records.

    Give the scene the model was trained on: its validation area is then data the weights
    never saw, and the test area stays untouched for ``evaluate --uncertainty``.
    """
    import json

    from ..plugin.core.errors import InputError
    from ..plugin.core.models import CARD_FILE, load_model
    from ..plugin.core.rasters import atomic_write
    from ..plugin.core.terrain import uses_terrain
    from .evaluate import split_from_card
    from .patches import make_scene
    from .splits import AreaLayout

    package = load_model(model_dir)
    if uses_terrain(package.card) and not terrain:
        raise InputError(model_dir, "predicts height above a coarse terrain, which calibration was not given",
                         "Give the terrain it was trained with (--terrain)")
    with EmbeddingRaster(embeddings) as source:
        grid = source.grid
    layout = AreaLayout(split_from_card(package.card), grid.height, grid.width)
    scene = make_scene(str(embeddings), str(reference), layout, terrain if uses_terrain(package.card) else None,
                       cell=16)
    result = calibrate_on_validation(package, scene, device=device, workdir=Path(model_dir), log=log)
    if not result:
        raise InputError(reference, "has no valid pixel in the validation area of the model's split",
                         "Give the scene the model was trained on")
    card_path = Path(model_dir) / CARD_FILE
    card = json.loads(card_path.read_text())
    card["uncertainty"] = {**result, "calibrated_with": {"embeddings": Path(embeddings).name,
                                                         "reference": Path(reference).name}}
    with atomic_write(card_path) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
    return card["uncertainty"]
