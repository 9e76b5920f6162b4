"""Size guard: a run over a very large raster must be asked for, not started by accident.

A 200,000 px square header is a few kilobytes on disk but a day of prediction; the
front ends pass the limit (``DEFAULT_MAX_MPX`` unless the user raised it or allowed
large areas) and their own wording of how to allow it, and the run is refused with one
line giving its size before any work starts.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import InputError

# 100 Mpx = 100 km x 100 km at 10 m: more than one whole AEF COG tile (8192^2 = 67 Mpx),
# minutes on a CPU; anything above is hours and hundreds of MB of output.
DEFAULT_MAX_MPX = 100.0
MAX_MPX_ENV = "ALPHAEARTH_HEIGHT_MAX_MPX"  # another default for every front end (CLI, Processing)


def positive_from_env(name: str, default: float, unit: str) -> float:
    """A positive number from environment variable ``name`` (``default`` when unset); else one line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise InputError(f"{name}={text}", f"is not a positive number of {unit}",
                         f"Set it to e.g. {default:g}, or unset it")
    return value


def default_max_mpx() -> float:
    """The limit a run gets unless told otherwise: $ALPHAEARTH_HEIGHT_MAX_MPX, else DEFAULT_MAX_MPX."""
    return positive_from_env(MAX_MPX_ENV, DEFAULT_MAX_MPX, "megapixels")


def megapixels(width: int, height: int) -> float:
    return int(width) * int(height) / 1e6


def check_size(subject: object, width: int, height: int, max_mpx: Optional[float], *,
               resolution_m: Optional[float] = None, details: str = "",
               allow: str = "Clip it to a smaller area first, or allow large areas explicitly") -> None:
    """Refuse ``width`` x ``height`` px above ``max_mpx`` megapixels (None or <= 0: no limit).

    ``details`` adds what the run would cost (e.g. ", about 1,100,000 tiles and 160 GB of
    output"); ``allow`` is the front end's own way of going ahead (a CLI flag, a checkbox).
    """
    if max_mpx is None or max_mpx <= 0:
        return
    mpx = megapixels(width, height)
    if mpx <= max_mpx:
        return
    area = ""
    if resolution_m:
        area = f", {_amount(mpx * resolution_m * resolution_m)} km²"  # 1 Mpx of 1 m² = 1 km²
    raise InputError(subject, f"is {int(width):,} x {int(height):,} px ({_amount(mpx)} Mpx{area}){details}, above "
                              f"the limit of {max_mpx:,g} Mpx for one run", allow)


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def format_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.0f} kB"
