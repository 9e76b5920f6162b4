"""AlphaEarth Foundations (AEF) embedding facts: band names, quantisation, attribution.

The public AEF GeoTIFFs store each embedding component as int8 after a *square-root*
companding, so de-quantisation is ``sign(q) * (|q| / 127.5) ** 2``; a linear ``q / 127.5``
is a known bug in other tools. ``-128`` marks nodata in all bands at once.
"""

from __future__ import annotations

import functools

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
    """The GeoTIFF profile of every AEF int8 raster we write (fetch outputs, cached tiles, the demo scene).

    Stored like the published tiles: band by band, ZSTD. Reading a model tile then costs a
    third of DEFLATE with a predictor, pixel by pixel, for the same size (embeddings barely
    compress and a predictor does not help them): the reader's CPU is what a 2-core
    prediction cannot hide behind the model. DEFLATE where this GDAL has no ZSTD.
    """
    return {"driver": "GTiff", "dtype": "int8", "count": N_BANDS, "nodata": NODATA_INT8,
            "width": width, "height": height, "crs": crs, "transform": transform, "tiled": True,
            "blockxsize": 256, "blockysize": 256, "compress": _int8_codec(), "interleave": "band",
            "BIGTIFF": "IF_SAFER"}


@functools.lru_cache(maxsize=1)
def _int8_codec() -> str:
    """'zstd' when this GDAL's GeoTIFF driver writes it (builds since GDAL 2.3 mostly do), else 'deflate'."""
    import rasterio
    from affine import Affine

    try:
        with rasterio.MemoryFile() as memory:
            with memory.open(driver="GTiff", width=1, height=1, count=1, dtype="int8", compress="zstd",
                             crs="EPSG:4326", transform=Affine(1, 0, 10, 0, -1, 50)) as dst:
                dst.write(np.zeros((1, 1, 1), dtype=np.int8))
            with memory.open() as src:
                return "zstd" if str(src.profile.get("compress", "")).lower() == "zstd" else "deflate"
    except rasterio.errors.RasterioError:  # a GDAL without ZSTD refuses the creation option
        return "deflate"


def describe(dst: object, *, attribution: str = ATTRIBUTION, **tags: str) -> None:
    """Band names A00..A63 and the tags that say what the int8 values are and where they came from."""
    for band, name in enumerate(BAND_NAMES, start=1):
        dst.set_band_description(band, name)
    dst.update_tags(ATTRIBUTION=attribution, QUANTISATION=QUANTISATION, SOFTWARE="AlphaEarth Height", **tags)


def _dequantise_table(nodata_value: float) -> np.ndarray:
    """The float32 value of each of the 256 int8 codes, indexed by the code's unsigned byte."""
    codes = np.arange(256, dtype=np.uint8).view(np.int8)
    scaled = codes.astype(np.float32) / np.float32(QUANT_SCALE)
    table = np.sign(scaled) * scaled * scaled
    table[codes == NODATA_INT8] = nodata_value
    return table


_TABLES = {"nan": _dequantise_table(np.nan), "zero": _dequantise_table(0.0)}


_DEQUANTISE_CHUNK = 1 << 18  # values per table pass: numpy widens the codes to 8-byte indices first


def dequantise(q: np.ndarray, out: np.ndarray | None = None, nodata: str = "nan") -> np.ndarray:
    """int8 AEF values -> float32 embeddings in [-1, 1]; -128 becomes NaN (``nodata="zero"``: 0.0,
    what a model is given).

    A lookup in a 256-entry table: one pass, several times faster than the arithmetic on
    the tens of millions of values a tile holds. It runs in chunks, so numpy's 8-byte
    copy of the indices stays in the CPU cache (half the time of one lookup over the
    whole tile). ``out`` (float32, the shape of ``q``) receives the values without
    another copy.
    """
    codes = np.ascontiguousarray(q, dtype=np.int8).view(np.uint8)
    if out is None:
        out = np.empty(codes.shape, dtype=np.float32)
    elif not out.flags.c_contiguous:  # no flat view to write through: one pass over the whole array
        return np.take(_TABLES[nodata], codes, out=out, mode="clip")
    flat_codes, flat_out, table = codes.reshape(-1), out.reshape(-1), _TABLES[nodata]
    for start in range(0, flat_codes.size, _DEQUANTISE_CHUNK):
        stop = start + _DEQUANTISE_CHUNK
        np.take(table, flat_codes[start:stop], out=flat_out[start:stop], mode="clip")
    return out


def quantise(v: np.ndarray) -> np.ndarray:
    """float embeddings -> int8 with the AEF encoder; NaN becomes -128."""
    v = np.asarray(v, dtype=np.float32)
    nan = ~np.isfinite(v)
    safe = np.where(nan, 0.0, v)
    q = np.clip(np.round(np.sign(safe) * np.sqrt(np.abs(safe)) * QUANT_SCALE), -127, 127)
    q = q.astype(np.int8)
    q[nan] = NODATA_INT8
    return q
