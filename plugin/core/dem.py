"""Terrain inputs by name: the Copernicus DEM (GLO-30, GLO-90) wherever a coarse terrain raster is accepted.

A terrain input is a raster file, or one of ``TERRAIN_PRODUCTS`` ("copernicus-30",
"copernicus-90"): the Copernicus DEM fetched for the area from its public Cloud-Optimized
GeoTIFFs (core.fetch.copernicus) and resampled onto the grid that needs it. This module
is light (no numpy, rasterio or GDAL at import time), so the dock and the Processing
algorithms can list the choices without loading them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .choices import TERRAIN_PRODUCTS
from .errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    from .rasters import Grid

ATTRIBUTION = ("© DLR e.V. 2010-2014 and © Airbus Defence and Space GmbH 2014-2018 provided under COPERNICUS "
               "by the European Union and ESA; all rights reserved")
LICENCE = "Copernicus DEM licence (ESA): free of charge; keep the attribution with any copy or derived product"
VERTICAL_DATUM = "EGM2008 geoid"
SEA_NOTE = ("Copernicus DEM tiles do not exist over open sea: there the terrain is 0 m "
            "(tiles listed in COPERNICUS_ABSENT_TILES)")


@dataclass(frozen=True)
class DemProduct:
    key: str            # the terrain input's name: "copernicus-30"
    name: str           # the product's own name: "GLO-30"
    code: str           # in tile names: Copernicus_DSM_COG_<code>_...
    arcsec: int         # pixel height in arc-seconds (widths grow with latitude)
    default_url: str    # the public bucket (no account)
    url_env: str        # environment variable overriding the base URL
    label: str          # for menus

    def base_url(self, override: Optional[str] = None) -> str:
        """``override``, else $<url_env>, else the public AWS bucket; no trailing slash."""
        return (override or os.environ.get(self.url_env, "").strip() or self.default_url).rstrip("/")


PRODUCTS = {p.key: p for p in (
    DemProduct("copernicus-30", "GLO-30", "10", 1, "https://copernicus-dem-30m.s3.amazonaws.com",
               "ALPHAEARTH_HEIGHT_COPERNICUS_30_URL", "Copernicus DEM 30 m (download)"),
    DemProduct("copernicus-90", "GLO-90", "30", 3, "https://copernicus-dem-90m.s3.amazonaws.com",
               "ALPHAEARTH_HEIGHT_COPERNICUS_90_URL", "Copernicus DEM 90 m (download)"),
)}
MARGIN_PX = 16  # px of the work grid fetched around it when a product is resolved for a grid


def is_product(terrain: Any) -> bool:
    """Whether a terrain input names a DEM product rather than a file."""
    return isinstance(terrain, str) and terrain.strip().lower() in PRODUCTS


def product(key: str) -> DemProduct:
    try:
        return PRODUCTS[key.strip().lower()]
    except (KeyError, AttributeError):
        raise InputError(f"terrain product {key!r}", "is unknown",
                         f"Use one of {', '.join(TERRAIN_PRODUCTS)} or a raster file") from None


def terrain_label(terrain: Optional[str]) -> str:
    """A short name for reports and tags: the product's name, or the file's name."""
    if not terrain:
        return ""
    if is_product(terrain):
        p = product(terrain)
        return f"Copernicus DEM {p.name}"
    return os.path.basename(os.fspath(terrain))


def resolve_terrain(terrain: Optional[str | os.PathLike], grid: Grid, *, cache_dir: Optional[str | os.PathLike] = None,
                    base_url: Optional[str] = None, cancel: Any = None, status: Any = None) -> Optional[Path]:
    """A raster file holding the terrain for ``grid``: the file itself, or for a product
    name the DEM fetched for the grid (plus MARGIN_PX) onto its lattice, cached so the
    same grid costs nothing the second time."""
    from pathlib import Path

    if terrain in (None, ""):
        return None
    if not is_product(terrain):
        return Path(terrain)
    from .fetch.copernicus import terrain_for_grid

    return terrain_for_grid(product(str(terrain)), grid, cache_dir=cache_dir, base_url=base_url, cancel=cancel,
                            status=status)
