"""Processing's predict and train with the Copernicus DEM as their coarse terrain ('Coarse terrain'
choice), fetched in the worker from the 127.0.0.1 mirror of tests/dem_mirror.py."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

pytest.importorskip("qgis.core")

from qgis.core import QgsProcessingException  # noqa: E402

from alphaearth_height.plugin.core import dem  # noqa: E402
from alphaearth_height.plugin.core.models import load_model  # noqa: E402
from alphaearth_height.plugin.core.terrain import predict_surface  # noqa: E402
from dem_mirror import build_dem_mirror  # noqa: E402
from range_server import RangeServer  # noqa: E402
from test_terrain_inputs import write_analytic_terrain  # noqa: E402


def test_each_terrain_choice_has_a_label_and_each_product_is_fetchable():
    from alphaearth_height.plugin.processing.base import TERRAIN_CHOICES, TERRAIN_LABELS

    assert len(TERRAIN_LABELS) == len(TERRAIN_CHOICES)
    assert all(dem.product(key).key == key for key in TERRAIN_CHOICES[1:])


@pytest.fixture(scope="module")
def run(run_algorithm):
    return run_algorithm


@pytest.fixture
def dem_server(tmp_path_factory, tmp_path, monkeypatch):
    """The mirror, with the worker processes pointed at it (and at a cache of their own) by environment."""
    root = tmp_path_factory.mktemp("dem_mirror")
    buckets = build_dem_mirror(root)
    with RangeServer(root) as srv:
        for key, bucket in buckets.items():
            monkeypatch.setenv(dem.PRODUCTS[key].url_env, f"{srv.url}/{bucket}")
        monkeypatch.setenv("ALPHAEARTH_HEIGHT_CACHE", str(tmp_path / "cache"))
        yield srv


def test_predict_with_the_copernicus_dem(run, dem_server, small_scene, terrain_model, tmp_path):
    params = {"INPUT": str(small_scene.embeddings), "MODEL": str(terrain_model), "BATCH_SIZE": 2, "DEVICE": 1,
              "TERRAIN_SOURCE": 1, "OUTPUT": str(tmp_path / "h.tif")}
    run("predictheight", params)
    assert any("_DEM.tif" in r[1] for r in dem_server.log.requests)
    analytic = write_analytic_terrain(tmp_path / "analytic.tif", small_scene.grid)
    predict_surface(small_scene.embeddings, terrain_model, tmp_path / "direct.tif", analytic, device="cpu",
                    batch_size=2)
    with rasterio.open(tmp_path / "h.tif") as got, rasterio.open(tmp_path / "direct.tif") as want:
        assert got.tags()["TERRAIN"] == "copernicus-30" and got.tags()["TERRAIN_ATTRIBUTION"] == dem.ATTRIBUTION
        a, b = got.read(1, masked=True), want.read(1, masked=True)
        assert got.transform == want.transform and np.array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.compressed(), b.compressed(), atol=0.02)
    with pytest.raises(QgsProcessingException, match="set both to a raster"):
        run("predictheight", {**params, "TERRAIN": str(analytic), "OUTPUT": str(tmp_path / "x.tif")})
    assert not (tmp_path / "x.tif").exists()


def test_train_relative_to_the_copernicus_dem(run, dem_server, small_scene, tmp_path):
    model = tmp_path / "model"
    run("trainmodel", {"EMBEDDINGS": str(small_scene.embeddings), "REFERENCE": str(small_scene.reference),
                       "ARCH": 0, "ENCODER_DEPTH": 3, "PATCH_SIZE": 64, "BATCH_SIZE": 2, "EPOCHS": 1,
                       "STEPS_PER_EPOCH": 1, "TERRAIN_SOURCE": 2, "DEVICE": 1, "OUTPUT": str(model)})
    card = load_model(model).card
    assert card["target"]["relative_to"]["product"] == "copernicus-90"
    assert any("Copernicus_DSM_COG_30_" in r[1] for r in dem_server.log.requests)
