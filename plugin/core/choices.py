"""Every choice a user makes by name, declared once and read by every front end.

The CLI's ``choices=``, the Processing enums, the dock's combos and core's own checks
all take their lists from here, so they cannot disagree. The module imports nothing
heavy (no numpy, rasterio or torch): QGIS reads it when it lists the algorithms.
Each ``Literal`` is the type; the tuple next to it is the same names in the order front
ends show them (enum indices of saved Processing models depend on it: add new names at the end).
"""

from __future__ import annotations

import datetime
from typing import Literal, get_args

Source = Literal["local", "cog", "earthengine"]
SOURCES: tuple[str, ...] = get_args(Source)
# what a user reads for each source (the dock's tooltips and the Processing labels)
SOURCE_LABELS: dict[str, str] = {"local": "Local raster", "cog": "AlphaEarth public COGs (no account)",
                                 "earthengine": "Google Earth Engine (needs an account)"}
SOURCE_HELP: dict[str, str] = {
    "local": "A 64-band embeddings raster on disk or in the project",
    "cog": "The public cloud-optimised GeoTIFFs: no account, only the area's blocks are downloaded",
    "earthengine": "Needs an Earth Engine account (earthengine authenticate) and a Google Cloud project"}

Architecture = Literal["unet", "unetplusplus"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(Device)
Backend = Literal["auto", "onnx", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Loss = Literal["mse", "huber", "l1"]
LOSSES: tuple[str, ...] = get_args(Loss)
Schedule = Literal["cosine", "plateau"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
SplitKind = Literal["contiguous", "blocks"]
SPLIT_KINDS: tuple[str, ...] = get_args(SplitKind)
Direction = Literal["east", "west", "north", "south"]  # the side held out for testing
DIRECTIONS: tuple[str, ...] = get_args(Direction)
TerrainProduct = Literal["copernicus-30", "copernicus-90"]
TERRAIN_PRODUCTS: tuple[str, ...] = get_args(TerrainProduct)
BiasMethod = Literal["auto", "offset", "linear", "quantile"]
BIAS_METHODS: tuple[str, ...] = get_args(BiasMethod)

FIRST_YEAR = 2017   # the first AlphaEarth annual embedding
DEFAULT_YEAR = 2020


def last_year() -> int:
    """The latest year a user may ask for: this one (a year's embeddings appear during the next;
    a source that lacks it says so)."""
    return datetime.date.today().year


def check_choice(value: object, choices: tuple[str, ...], what: str) -> str:
    """``value`` when it is one of ``choices``; else the one-line input error naming them."""
    from .errors import InputError

    if value not in choices:
        raise InputError(f"{what} {value!r}", "is not known", f"Use one of: {', '.join(choices)}")
    return str(value)
