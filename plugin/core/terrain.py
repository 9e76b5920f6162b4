"""Prediction for models trained on height above a coarse terrain raster: the network
gives local relief, and the terrain (resampled onto the embedding grid) is added back.

Streaming like ``predict_height``: the relief is written first, then summed with the
terrain block by block; the output appears only once complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import rasterio
from rasterio.errors import RasterioError

from .dem import is_product, resolve_terrain
from .errors import InputError
from .inference import PredictionResult, predict_height, terrain_not_given
from .models import ModelPackage, open_package
from .rasters import EmbeddingRaster, check_output_path, make_partial_dir, map_height_raster, read_height_grid
from .resample import ReferenceOnGrid


def uses_terrain(card: dict) -> bool:
    """Whether a model card's target is height above a coarse terrain (so predicting needs one)."""
    return bool(card["target"].get("relative_to"))


def needs_terrain(package: ModelPackage, terrain: Optional[str | os.PathLike]) -> bool:
    """Whether ``terrain`` is to be added to ``package``'s output; refuses a terrain the model was
    trained without, and a missing one for a model trained with one.

    One place for both refusals, so a run on one process and a run on a Dask cluster
    refuse with the same line.
    """
    if not uses_terrain(package.card):
        if terrain:
            raise InputError(terrain, f"was given but {package.name} was trained without a terrain input",
                             "Leave the terrain input empty for this model")
        return False
    if not terrain:
        raise terrain_not_given(package)
    return True


def predict_surface(embeddings: str | os.PathLike, model: str | os.PathLike | ModelPackage,
                    out_path: str | os.PathLike, terrain: Optional[str | os.PathLike] = None,
                    cache_dir: Optional[str | os.PathLike] = None, **options) -> PredictionResult:
    """``predict_height``, adding the coarse terrain back for models that need it.

    ``terrain`` is a raster file or a DEM product name (core.dem: "copernicus-30",
    "copernicus-90"), fetched for the embeddings' grid into the cache (``cache_dir``).
    """
    package = model if isinstance(model, ModelPackage) else open_package(model)
    if not needs_terrain(package, terrain):
        return predict_height(embeddings, package, out_path, **options)
    out = check_output_path(out_path, embeddings, *([] if is_product(terrain) else [terrain]))
    terrain = terrain_on_embeddings_grid(terrain, embeddings, cache_dir=cache_dir, cancel=options.get("cancel"))
    scratch = make_partial_dir(out)
    try:
        relief = scratch / "relief.tif"
        result = predict_height(embeddings, package, relief, relative=True, **options)
        _add_terrain(relief, terrain, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.path = out
    return result


def _add_terrain(relief: Path, terrain: str | os.PathLike, out: Path) -> None:
    src, grid = read_height_grid(relief)
    with src, ReferenceOnGrid(terrain, grid) as ground:
        kept = {k: v for k, v in src.tags().items() if k not in ("ATTRIBUTION", "SOFTWARE", "AREA_OR_POINT")}
        map_height_raster(relief, out, lambda relief_block, window: relief_block + ground.read(window),
                          "predicted surface height", tags={**kept, **terrain_tags(terrain)})


def terrain_on_embeddings_grid(terrain: Optional[str | os.PathLike], embeddings: str | os.PathLike, *,
                               cache_dir: Optional[str | os.PathLike] = None, cancel=None) -> Optional[Path]:
    """A terrain input as a file: itself, or a DEM product fetched for the embeddings' grid."""
    if not is_product(terrain):
        return None if terrain in (None, "") else Path(terrain)
    with EmbeddingRaster(embeddings) as raster:
        grid = raster.grid
    return resolve_terrain(terrain, grid, cache_dir=cache_dir, cancel=cancel)


def terrain_tags(terrain: str | os.PathLike) -> dict:
    """Tags naming the terrain an output was made with (and its attribution, for a fetched DEM)."""
    tags = {"TERRAIN": Path(terrain).name}
    try:
        with rasterio.open(terrain) as src:
            source = src.tags()
    except RasterioError:
        return tags
    if source.get("TERRAIN_PRODUCT"):
        tags.update(TERRAIN=source["TERRAIN_PRODUCT"], TERRAIN_SOURCE=source.get("SOURCE", ""),
                    TERRAIN_ATTRIBUTION=source.get("ATTRIBUTION", ""))
    return tags
