"""Areas of interest: a rectangle in any CRS, snapped onto an embedding grid.

The fetchers (core.fetch) turn an AOI into a grid; the dock shows its size estimate
before anything is fetched, so it must stay instant and offline. rasterio is imported
only when a CRS is transformed, so light processes (core.job in QGIS) can import this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from rasterio.crs import CRS
    from rasterio.windows import Window

    from .rasters import Grid



@dataclass(frozen=True)
class AreaOfInterest:
    """A rectangle ``(xmin, ymin, xmax, ymax)`` in ``crs`` (any CRS GDAL knows)."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    crs: str

    def __post_init__(self) -> None:
        if not (self.xmax > self.xmin and self.ymax > self.ymin):
            raise InputError(f"area of interest {self.bounds}", "is empty (max must exceed min)",
                             "Draw or give a rectangle with a non-zero width and height")

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return self.xmin, self.ymin, self.xmax, self.ymax

    def to_dict(self) -> dict:
        """JSON-safe form (``from_dict`` gives an equal AOI back)."""
        return {"xmin": self.xmin, "ymin": self.ymin, "xmax": self.xmax, "ymax": self.ymax, "crs": str(self.crs)}

    @classmethod
    def from_dict(cls, data: dict) -> "AreaOfInterest":
        return cls(float(data["xmin"]), float(data["ymin"]), float(data["xmax"]), float(data["ymax"]),
                   str(data["crs"]))

    def bounds_in(self, crs: CRS | str) -> tuple[float, float, float, float]:
        """The AOI's bounds in ``crs``; an unknown CRS or impossible coordinates are input errors."""
        from rasterio.errors import CRSError
        from rasterio.warp import transform_bounds

        source = self.source_crs()
        target = parse_crs(crs, f"CRS {crs}")
        try:
            bounds = transform_bounds(source, target, *self.bounds, densify_pts=21)
        except (CRSError, ValueError, RuntimeError) as exc:
            bounds, reason = (math.nan,) * 4, " ".join(str(exc).split())
        else:
            reason = "the result is not finite"
        if not all(math.isfinite(v) for v in bounds):
            raise InputError(f"area of interest {self.bounds} ({self.crs})",
                             f"cannot be expressed in {target.to_string()} ({reason})",
                             "Check the coordinates and their CRS (--aoi-crs)")
        return bounds

    def source_crs(self) -> CRS:
        """The AOI's CRS, checked: known to GDAL, and degrees within ±180/±90 if geographic."""
        crs = parse_crs(self.crs, f"CRS {self.crs!r} of the area of interest")
        if crs.is_geographic:
            problems = [f"latitude {v:g} (outside -90..90)" for v in (self.ymin, self.ymax) if not -90.0 <= v <= 90.0]
            problems += [f"longitude {v:g} (outside -180..180)" for v in (self.xmin, self.xmax)
                         if not -180.0 <= v <= 180.0]
            if problems:
                raise InputError(f"area of interest {self.bounds} ({self.crs})", f"has {' and '.join(problems)}",
                                 "Give XMIN YMIN XMAX YMAX as longitude then latitude in degrees, or give "
                                 "the CRS the numbers are in (--aoi-crs)")
        return crs


def bounds_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (xmin, ymin, xmax, ymax) boxes in the same CRS share some area (touching is not enough)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def parse_crs(value: object, subject: str) -> CRS:
    """A rasterio CRS from anything GDAL understands; otherwise a one-line input error."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    if isinstance(value, CRS):
        return value
    import rasterio

    try:
        with rasterio.Env():  # GDAL's own complaint goes to the log, not to stderr
            return CRS.from_user_input(value)
    except (CRSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()).rstrip(".").replace(". ", "; ") or "unknown"
        raise InputError(subject, f"is not a coordinate reference system GDAL knows ({reason})",
                         "Give an EPSG code such as EPSG:4326 or EPSG:32630, or a WKT or PROJ string") from None


def utm_crs(lon: float, lat: float) -> str:
    """The WGS 84 / UTM zone CRS holding a point (AEF images are one UTM zone each)."""
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"


def work_crs(aoi: AreaOfInterest) -> str:
    """UTM zone of the AOI's centre."""
    lon0, lat0, lon1, lat1 = aoi.bounds_in("EPSG:4326")
    return utm_crs((lon0 + lon1) / 2, (lat0 + lat1) / 2)


def aoi_window(grid: Grid, aoi: AreaOfInterest, source: object = "embeddings") -> Window:
    """The grid window covering the AOI (outward-snapped to whole pixels, clipped to the grid)."""
    from rasterio.windows import Window

    xmin, ymin, xmax, ymax = aoi.bounds_in(grid.crs)
    inverse = ~grid.transform
    c0, r0 = inverse * (xmin, ymax)
    c1, r1 = inverse * (xmax, ymin)
    col0, row0 = max(0, math.floor(c0 + 1e-9)), max(0, math.floor(r0 + 1e-9))
    col1, row1 = min(grid.width, math.ceil(c1 - 1e-9)), min(grid.height, math.ceil(r1 - 1e-9))
    if col1 <= col0 or row1 <= row0:
        raise InputError(f"area of interest {tuple(round(v, 1) for v in aoi.bounds)} ({aoi.crs})",
                         f"does not overlap {source}",
                         "Draw the area inside the embeddings' footprint or choose other embeddings")
    return Window(col0, row0, col1 - col0, row1 - row0)
