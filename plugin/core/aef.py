"""AlphaEarth Foundations (AEF) embedding facts: band names, quantisation, attribution.

The public AEF GeoTIFFs store each embedding component as int8 after a *square-root*
companding, so de-quantisation is ``sign(q) * (|q| / 127.5) ** 2``; a linear ``q / 127.5``
is a known bug in other tools. ``-128`` marks nodata in all bands at once.
"""

from __future__ import annotations

import numpy as np

N_BANDS = 64
BAND_NAMES = tuple(f"A{i:02d}" for i in range(N_BANDS))
NODATA_INT8 = -128
QUANT_SCALE = 127.5
ATTRIBUTION = (
    "AlphaEarth Foundations Satellite Embedding dataset, produced by Google and "
    "Google DeepMind, licensed CC-BY 4.0"
)
QUANTISATION = f"AEF int8: value = sign(q) * (|q| / {QUANT_SCALE})^2, nodata {NODATA_INT8}"


def int8_profile(width: int, height: int, crs: object, transform: object) -> dict:
    """The GeoTIFF profile of every AEF int8 raster we write (fetch outputs, cached tiles, the demo scene)."""
    return {"driver": "GTiff", "dtype": "int8", "count": N_BANDS, "nodata": NODATA_INT8,
            "width": width, "height": height, "crs": crs, "transform": transform, "tiled": True,
            "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 2,
            "interleave": "pixel", "BIGTIFF": "IF_SAFER"}


def describe(dst: object, *, attribution: str = ATTRIBUTION, **tags: str) -> None:
    """Band names A00..A63 and the tags that say what the int8 values are and where they came from."""
    for band, name in enumerate(BAND_NAMES, start=1):
        dst.set_band_description(band, name)
    dst.update_tags(ATTRIBUTION=attribution, QUANTISATION=QUANTISATION, SOFTWARE="AlphaEarth Height", **tags)


def dequantise(q: np.ndarray) -> np.ndarray:
    """int8 AEF values -> float32 embeddings in [-1, 1]; -128 becomes NaN."""
    q = np.asarray(q)
    scaled = q.astype(np.float32) / np.float32(QUANT_SCALE)
    values = np.sign(scaled) * scaled * scaled
    values[q == NODATA_INT8] = np.nan
    return values


def quantise(v: np.ndarray) -> np.ndarray:
    """float embeddings -> int8 with the AEF encoder; NaN becomes -128."""
    v = np.asarray(v, dtype=np.float32)
    nan = ~np.isfinite(v)
    safe = np.where(nan, 0.0, v)
    q = np.clip(np.round(np.sign(safe) * np.sqrt(np.abs(safe)) * QUANT_SCALE), -127, 127)
    q = q.astype(np.int8)
    q[nan] = NODATA_INT8
    return q
