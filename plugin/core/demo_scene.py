"""A deterministic synthetic AlphaEarth scene with a reference DSM, for the demo and tests.

Generative model (all seeded, no downloads):
1. Terrain: fractal noise (Gaussian-filtered white noise at several scales) plus a
   west-to-east regional rise, so the eastern (test) part is higher than the western
   (training) part, as in the paper's split.
2. Land cover (8 classes) at 10 m: each class prefers a height band (water also valley
   floors, bare rock also steep slopes); the class at each pixel is drawn from noisy
   logits, so one pixel says little about height but its neighbourhood says much more.
3. Embeddings: each class has a random unit prototype vector; a pixel's embedding is its
   class prototype plus spatially smooth and white noise, normalised to unit length and
   quantised with the AEF int8 encoder; a few nodata holes (-128).
4. Reference DSM: terrain at 5 m plus object heights (forest canopy, buildings) and
   noise, warped to Lambert-93 (EPSG:2154) at 5 m, as IGN's RGE ALTI is delivered.
Height reaches the embeddings only through land cover and its spatial arrangement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window

from . import aef
from .rasters import Grid, atomic_write

EMBEDDINGS_CRS = "EPSG:32630"        # UTM 30N, Nouvelle-Aquitaine
REFERENCE_CRS = "EPSG:2154"          # Lambert-93, the CRS of IGN's RGE ALTI
ORIGIN = (690_000.0, 4_975_000.0)    # upper-left corner, near Bordeaux
REFERENCE_NODATA = -99999.0
TEST_FRACTION = 0.3

# name, preferred height (m), spread (m), object height on top of terrain (m)
CLASSES = (
    ("water", 40.0, 60.0, 0.0),
    ("built-up", 80.0, 70.0, 12.0),
    ("cropland", 110.0, 80.0, 0.5),
    ("grassland", 220.0, 90.0, 0.3),
    ("broadleaf forest", 320.0, 90.0, 20.0),
    ("conifer forest", 430.0, 90.0, 24.0),
    ("heath", 540.0, 90.0, 1.0),
    ("bare rock", 650.0, 110.0, 0.0),
)


@dataclass(frozen=True)
class DemoScene:
    embeddings: Path
    reference: Path
    grid: Grid
    test_start_col: int

    @property
    def train_window(self) -> Window:
        return Window(0, 0, self.test_start_col, self.grid.height)

    @property
    def test_window(self) -> Window:
        return Window(self.test_start_col, 0, self.grid.width - self.test_start_col, self.grid.height)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` pixels, scaled to unit std."""
    out = smooth_field(rng.standard_normal(shape), sigma)
    return ((out - out.mean()) / (out.std() + 1e-12)).astype(np.float32)


def _terrain(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Terrain height (m) on a 5 m grid: fractal relief plus a west-to-east rise."""
    relief = sum(w * smooth_noise(rng, shape, s) for w, s in ((1.0, 160), (0.6, 64), (0.35, 24), (0.15, 8)))
    relief = relief / relief.std()
    rise = np.linspace(0.0, 1.0, shape[1], dtype=np.float32)[None, :]
    return np.maximum(200.0 + 110.0 * relief + 180.0 * (rise - 0.5), 1.0).astype(np.float32)


def _land_cover(rng: np.random.Generator, terrain10: np.ndarray) -> np.ndarray:
    """Class index per 10 m pixel from height, valley position, slope and noisy logits."""
    h = terrain10
    gy, gx = np.gradient(h, 10.0)
    slope = np.hypot(gx, gy)
    valley = smooth_field(h, 25.0) - h          # > 0 on valley floors
    logits = []
    for k, (_, mu, spread, _) in enumerate(CLASSES):
        logit = -0.5 * ((h - mu) / spread) ** 2
        if k == 0:
            logit = logit + np.clip(valley / 8.0, -3, 3) - 1.0
        if k == 7:
            logit = logit + 6.0 * slope
        logits.append(logit + 1.1 * smooth_noise(rng, h.shape, 1.2))
    return np.argmax(np.stack(logits), axis=0).astype(np.uint8)


def smooth_field(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of a field (FFT, periodic), keeping its mean."""
    fy = np.fft.fftfreq(values.shape[0])[:, None]
    fx = np.fft.rfftfreq(values.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx * fx + fy * fy))
    return np.fft.irfft2(np.fft.rfft2(values) * transfer, s=values.shape).astype(np.float32)


def _embeddings(rng: np.random.Generator, cover: np.ndarray) -> np.ndarray:
    """Unit-length 64-D embeddings: class prototype + smooth and white noise, quantised."""
    prototypes = rng.standard_normal((len(CLASSES), aef.N_BANDS)).astype(np.float32)
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    values = prototypes[cover].transpose(2, 0, 1).copy()
    for band in range(aef.N_BANDS):
        values[band] += 0.09 * smooth_noise(rng, cover.shape, 2.0)
        values[band] += 0.06 * rng.standard_normal(cover.shape).astype(np.float32)
    values /= np.linalg.norm(values, axis=0, keepdims=True)
    return aef.quantise(values)


def _nodata_holes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few elliptic gaps and a missing corner strip, as real mosaics have."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    holes = np.zeros(shape, dtype=bool)
    for _ in range(3):
        cy, cx = rng.uniform(0.1, 0.9) * shape[0], rng.uniform(0.1, 0.9) * shape[1]
        ry, rx = rng.uniform(8, 25), rng.uniform(8, 25)
        holes |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    holes[: shape[0] // 16, : shape[1] // 10] = True
    return holes


def generate_demo_scene(out_dir: str | os.PathLike, width: int = 1024, height: int = 1024,
                        seed: int = 2020) -> DemoScene:
    """Write ``embeddings.tif`` (AEF int8, EPSG:32630, 10 m) and ``reference_dsm.tif``
    (float32, EPSG:2154, 5 m) into ``out_dir``; identical bytes for identical arguments."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    terrain5 = _terrain(rng, (2 * height, 2 * width))
    terrain10 = terrain5.reshape(height, 2, width, 2).mean(axis=(1, 3))
    cover = _land_cover(rng, terrain10)
    quantised = _embeddings(rng, cover)
    quantised[:, _nodata_holes(rng, cover.shape)] = aef.NODATA_INT8

    grid = Grid(CRS.from_string(EMBEDDINGS_CRS), Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1]), width, height)
    embeddings = out / "embeddings.tif"
    _write_embeddings(embeddings, quantised, grid)

    objects = np.array([c[3] for c in CLASSES], dtype=np.float32)[cover]
    dsm5 = terrain5 + np.kron(objects, np.ones((2, 2), dtype=np.float32))
    dsm5 += 0.5 * rng.standard_normal(dsm5.shape).astype(np.float32)
    reference = out / "reference_dsm.tif"
    _write_reference(reference, dsm5, grid)
    return DemoScene(embeddings, reference, grid, int(round(width * (1 - TEST_FRACTION))))


def _write_embeddings(path: Path, quantised: np.ndarray, grid: Grid) -> None:
    with atomic_write(path) as tmp:
        with rasterio.open(tmp, "w", **aef.int8_profile(grid.width, grid.height, grid.crs, grid.transform)) as dst:
            dst.write(quantised)
            aef.describe(dst, attribution="Synthetic demo scene in AlphaEarth int8 form (not Google data)",
                         YEAR="2020", SOURCE="alphaearth_height demo scene generator")


def _write_reference(path: Path, dsm5: np.ndarray, grid: Grid) -> None:
    src_transform = Affine(5.0, 0, grid.transform.c, 0, -5.0, grid.transform.f)
    height, width = dsm5.shape
    left, top = grid.transform.c, grid.transform.f
    bounds = (left, top - 5.0 * height, left + 5.0 * width, top)
    dst_crs = CRS.from_string(REFERENCE_CRS)
    transform, w, h = calculate_default_transform(grid.crs, dst_crs, width, height, *bounds, resolution=5.0)
    transform = Affine(5.0, 0, np.floor(transform.c / 5) * 5, 0, -5.0, np.ceil(transform.f / 5) * 5)
    target = np.full((h + 1, w + 1), REFERENCE_NODATA, dtype=np.float32)
    reproject(dsm5, target, src_transform=src_transform, src_crs=grid.crs, dst_transform=transform,
              dst_crs=dst_crs, resampling=Resampling.bilinear, dst_nodata=REFERENCE_NODATA)
    profile = {"driver": "GTiff", "dtype": "float32", "count": 1, "nodata": REFERENCE_NODATA,
               "width": target.shape[1], "height": target.shape[0], "crs": dst_crs, "transform": transform,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 3}
    with atomic_write(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(target, 1)
            dst.set_band_description(1, "reference surface height (synthetic DSM)")
            dst.update_tags(1, UNITS="m")
            dst.update_tags(SOURCE="alphaearth_height demo scene generator (synthetic, not IGN data)")


# Synthetic stand-ins for the Copernicus DEM over the demo scene: (file, arc-seconds per pixel, noise in m)
COARSE_DEMS = {"30m": ("coarse_dem_30m.tif", 1, 2.0), "90m": ("coarse_dem_90m.tif", 3, 2.0)}


def write_coarse_dems(scene: DemoScene, out_dir: str | os.PathLike, seed: int = 30) -> dict[str, Path]:
    """Coarse DEMs like the Copernicus GLO-30 and GLO-90 over the scene, made from its reference DSM.

    Each is the reference DSM averaged onto an EPSG:4326 grid of 1" (30 m) or 3" (90 m)
    pixels, as the Copernicus DEM is published at this latitude, plus white noise of
    2 m (the Copernicus DEM's stated absolute accuracy is under 4 m, LE90). Like the real
    one it is a surface model (canopy and buildings in), just coarse: a strong baseline.
    Tagged as synthetic: this is not Copernicus data.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    wgs84 = CRS.from_epsg(4326)
    paths = {}
    with rasterio.open(scene.reference) as ref:
        west, south, east, north = transform_bounds(scene.grid.crs, wgs84, *scene.grid.bounds, densify_pts=21)
        for key, (name, arcsec, noise) in COARSE_DEMS.items():
            step = arcsec / 3600.0
            # pixel-is-point on whole multiples of the pixel size, as the published tiles are
            left, top = (np.floor(west / step) - 1.5) * step, (np.ceil(north / step) + 1.5) * step
            width, height = int(np.ceil((east - left) / step)) + 2, int(np.ceil((top - south) / step)) + 2
            transform = Affine(step, 0, left, 0, -step, top)
            dem = np.full((height, width), np.nan, dtype=np.float32)
            reproject(rasterio.band(ref, 1), dem, dst_transform=transform, dst_crs=wgs84,
                      resampling=Resampling.average, dst_nodata=np.nan)
            dem += noise * rng.standard_normal(dem.shape).astype(np.float32)
            profile = {"driver": "GTiff", "dtype": "float32", "count": 1, "nodata": REFERENCE_NODATA,
                       "width": width, "height": height, "crs": wgs84, "transform": transform,
                       "compress": "deflate", "predictor": 3}
            path = out / name
            with atomic_write(path) as tmp:
                with rasterio.open(tmp, "w", **profile) as dst:
                    dst.write(np.where(np.isfinite(dem), dem, REFERENCE_NODATA).astype(np.float32), 1)
                    dst.set_band_description(1, f"synthetic coarse DEM ({arcsec}\" pixels)")
                    dst.update_tags(1, UNITS="m")
                    dst.update_tags(SOURCE=f"alphaearth_height demo scene generator: the reference DSM averaged "
                                           f"onto {arcsec}\" pixels plus {noise:g} m noise (synthetic, not "
                                           "Copernicus data)")
            paths[key] = path
    return paths
