"""Shared fixtures: real rasters written with rasterio, real (small) torch models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The plugin's runs go to a worker process; in tests it is this venv's Python (which has
# everything), not an environment the plugin would install into a QGIS profile.
os.environ.setdefault("ALPHAEARTH_HEIGHT_PYTHON", sys.executable)

from alphaearth_height.plugin.core import aef  # noqa: E402
from alphaearth_height.plugin.core.resample import ReferenceOnGrid  # noqa: E402
from alphaearth_height.plugin.core.demo_scene import generate_demo_scene  # noqa: E402
from alphaearth_height.plugin.core.models import architecture_config, build_model, make_card, save_model  # noqa: E402

UTM = "EPSG:32630"
ORIGIN = (690_000.0, 4_975_000.0)


def unit_embeddings(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random unit-length float embeddings (64, h, w)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((aef.N_BANDS, height // 8 + 2, width // 8 + 2)).astype(np.float32)
    values = np.kron(coarse, np.ones((8, 8), dtype=np.float32))[:, :height, :width]
    values += 0.3 * rng.standard_normal(values.shape).astype(np.float32)
    return values / np.linalg.norm(values, axis=0, keepdims=True)


def write_embeddings(path: Path, values: np.ndarray, *, quantised: bool = True, bottom_up: bool = False,
                     crs: str = UTM, origin: tuple[float, float] = ORIGIN, nodata: float | None = None) -> Path:
    """Write (64, h, w) north-up values as AEF int8 (or float32), optionally stored bottom-up."""
    bands, height, width = values.shape
    data = aef.quantise(values) if quantised else values.astype(np.float32)
    transform = Affine(10.0, 0, origin[0], 0, -10.0, origin[1])
    if bottom_up:
        data = data[:, ::-1, :]
        transform = Affine(10.0, 0, origin[0], 0, 10.0, origin[1] - 10.0 * height)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "crs": crs,
               "transform": transform, "dtype": "int8" if quantised else "float32",
               "nodata": aef.NODATA_INT8 if quantised else nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def save_tiny_model(folder: Path, name: str, **target) -> Path:
    """A small random-weight U-Net package (depth 3); ``target`` goes into the card's target section."""
    import torch

    torch.manual_seed(0)
    config = architecture_config("unet", "resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])
    module = build_model(config).eval()
    card = make_card(config, name=name, target_mean=100.0, target_std=50.0, tile=64, overlap=16)
    card["target"].update(target)
    return save_model(folder, module, card)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "tiny test U-Net")


@pytest.fixture(scope="session")
def terrain_model(tmp_path_factory) -> Path:
    """The tiny model as if trained relative to a coarse terrain (as training --terrain writes its card)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "terrain", "tiny terrain U-Net",
                           relative_to={"input": "coarse terrain", "file": "terrain.tif"})


def coarse_terrain(scene, path: Path) -> Path:
    """A 160 m terrain raster (block means of the reference), as a coarse DEM would be."""
    grid = scene.grid
    with ReferenceOnGrid(scene.reference, grid) as ref:
        values = ref.read(Window(0, 0, grid.width, grid.height))
    blocks = np.nanmean(values.reshape(16, 16, 16, 16), axis=(1, 3))
    transform = grid.transform * grid.transform.scale(16, 16)
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=1, dtype="float32", crs=grid.crs,
                       transform=transform, nodata=-9999) as dst:
        dst.write(np.nan_to_num(blocks, nan=-9999).astype(np.float32), 1)
    return path


@pytest.fixture(scope="session")
def scene_terrain(small_scene, tmp_path_factory) -> Path:
    return coarse_terrain(small_scene, tmp_path_factory.mktemp("terrain") / "terrain.tif")


@pytest.fixture(scope="session")
def small_scene(tmp_path_factory):
    """The demo scene generator at 256 x 256 px."""
    return generate_demo_scene(tmp_path_factory.mktemp("scene"), width=256, height=256, seed=7)


PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"


@pytest.fixture(scope="session")
def qgis_app():
    """One real QgsApplication (offscreen) for the whole run, with Processing initialised."""
    import sys

    from qgis.core import QgsApplication

    app = QgsApplication.instance()
    if app is None:
        app = QgsApplication([], True)  # GUI enabled: docks and canvases need widgets
        app.initQgis()
    if PROCESSING_PLUGINS not in sys.path:
        sys.path.append(PROCESSING_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    yield app


@pytest.fixture(scope="session")
def processing_provider(qgis_app):
    """The plugin's Processing provider, registered once for the whole run (whoever asks first)."""
    from qgis.core import QgsApplication

    from alphaearth_height.plugin.processing.provider import AlphaEarthHeightProvider

    registry = QgsApplication.processingRegistry()
    provider = registry.providerById("alphaearth_height")
    if provider is None:
        provider = AlphaEarthHeightProvider()
        assert registry.addProvider(provider)
    return provider


@pytest.fixture(scope="session")
def run_algorithm(processing_provider):
    """``run_algorithm(alg_id, params, feedback=None)``: one of the plugin's algorithms through processing.run."""
    import processing

    def run(alg_id: str, params: dict, feedback=None) -> dict:
        return processing.run(f"alphaearth_height:{alg_id}", params, feedback=feedback)

    return run


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Test artifacts (rendered PNGs) kept after the run, under test-artifacts/."""
    folder = Path(__file__).resolve().parents[1] / "test-artifacts"
    folder.mkdir(exist_ok=True)
    return folder


def assert_same_raster(got: Path, want: Path, atol: float = 0.01) -> None:
    """Band 1 of two rasters: the same shape and nodata (-9999) pixels, some data, values within ``atol``."""
    import rasterio

    with rasterio.open(got) as a_src, rasterio.open(want) as b_src:
        a, b = a_src.read(1), b_src.read(1)
    assert a.shape == b.shape
    assert np.array_equal(a == -9999.0, b == -9999.0)
    assert (b != -9999.0).any()
    assert np.abs(a - b).max() <= atol
