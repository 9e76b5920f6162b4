"""The Processing provider in a real (offscreen) QGIS: every algorithm through processing.run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

pytest.importorskip("qgis.core")

from qgis.core import (QgsProcessingException, QgsProcessingFeedback, QgsProject,  # noqa: E402
                       QgsRasterLayer, QgsSingleBandPseudoColorRenderer)

from alphaearth_height.plugin.core.aoi import AreaOfInterest  # noqa: E402
from alphaearth_height.plugin.core.models import load_model  # noqa: E402
from range_server import PREFIX, RangeServer, build_mirror, expected_output  # noqa: E402

UTM = "EPSG:32630"


@pytest.fixture(scope="module")
def provider(processing_provider):
    return processing_provider


@pytest.fixture(scope="module")
def run(provider):
    import processing

    def run_algorithm(alg_id: str, params: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
        return processing.run(f"alphaearth_height:{alg_id}", params, feedback=feedback)
    return run_algorithm


@pytest.fixture(scope="module")
def cog_mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    return root, build_mirror(root)


@pytest.fixture(scope="module")
def predicted(run, small_scene, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "height.tif"
    result = run("predictheight", {"INPUT": str(small_scene.embeddings), "MODEL": str(tiny_model),
                                   "BATCH_SIZE": 2, "DEVICE": 1, "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out)
    return out


class Recorder(QgsProcessingFeedback):
    """Feedback that keeps the messages an algorithm reports."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def pushInfo(self, info: str) -> None:  # noqa: N802 - QGIS API
        self.messages.append(info)


def open_layer(path: Path) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), path.stem)
    assert layer.isValid(), path
    return layer


def three_band_raster(path: Path) -> Path:
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 3, "dtype": "uint8", "crs": UTM,
               "transform": Affine(10.0, 0, 690_000.0, 0, -10.0, 4_975_000.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((3, 32, 32), dtype=np.uint8))
    return path


def test_provider_lists_the_five_algorithms(provider):
    ids = sorted(alg.name() for alg in provider.algorithms())
    assert ids == ["compareheights", "correctbias", "fetchembeddings", "predictheight", "trainmodel"]
    assert provider.id() == "alphaearth_height" and not provider.icon().isNull()
    for alg in provider.algorithms():
        assert alg.shortHelpString() and alg.group() and alg.outputDefinitions()


def test_fetch_clips_to_the_extent_on_the_source_grid(run, small_scene, tmp_path):
    left, top = small_scene.grid.transform.c, small_scene.grid.transform.f
    xmin, xmax, ymin, ymax = left + 500, left + 1500, top - 1300, top - 500
    feedback = Recorder()
    out = tmp_path / "clip.tif"
    run("fetchembeddings", {"INPUT": str(small_scene.embeddings), "EXTENT": f"{xmin},{xmax},{ymin},{ymax} [{UTM}]",
                            "OUTPUT": str(out)}, feedback)
    layer = open_layer(out)
    assert layer.crs().authid() == UTM
    assert (layer.width(), layer.height(), layer.bandCount()) == (100, 80, 64)
    extent = layer.extent()
    assert (extent.xMinimum(), extent.xMaximum(), extent.yMinimum(), extent.yMaximum()) == (xmin, xmax, ymin, ymax)
    assert any(m.startswith("local 2020: 100x80 px") and "MiB to download" in m for m in feedback.messages)


def test_fetch_accepts_an_extent_in_another_crs(run, small_scene, tmp_path):
    from rasterio.warp import transform_bounds

    left, bottom, right, top = small_scene.grid.bounds
    lon0, lat0, lon1, lat1 = transform_bounds(UTM, "EPSG:4326", left + 600, bottom + 600, right - 600, top - 600)
    out = tmp_path / "clip.tif"
    run("fetchembeddings", {"INPUT": str(small_scene.embeddings), "EXTENT": f"{lon0},{lon1},{lat0},{lat1} [EPSG:4326]",
                            "OUTPUT": str(out)})
    layer = open_layer(out)
    assert layer.crs().authid() == UTM
    assert 130 <= layer.width() < 256 and 130 <= layer.height() < 256


def test_fetch_from_the_public_cogs(run, cog_mirror, tmp_path):
    """The COG source through a real HTTP server on 127.0.0.1 standing in for the mirror."""
    from alphaearth_height.plugin.core.fetch.tiling import output_grid

    root, cogs = cog_mirror
    west = cogs["w"]
    extent = (west.left + 1000, west.bottom + 1200, west.left + 2500, west.bottom + 2000)
    feedback = Recorder()
    out = tmp_path / "cog.tif"
    with RangeServer(root) as server:
        run("fetchembeddings", {"SOURCE": 1, "EXTENT": "{},{},{},{} [EPSG:32630]".format(*extent[::2], *extent[1::2]),
                                "YEAR": 2020, "BASE_URL": f"{server.url}/{PREFIX}",
                                "CACHE_DIR": str(tmp_path / "cache"), "OUTPUT": str(out)}, feedback)
    assert any(m.startswith("cog 2020: 150x80 px") and "1 COG file(s)" in m for m in feedback.messages)
    grid = output_grid(AreaOfInterest(*extent, UTM))
    with rasterio.open(out) as ds:
        assert ds.crs.to_string() == UTM and ds.transform == grid.transform
        assert np.array_equal(ds.read(), expected_output(grid, [west]))
    assert (tmp_path / "cache").is_dir()


def test_fetch_source_errors_and_cancel(run, small_scene, tmp_path):
    extent = f"690000,690500,4974500,4975000 [{UTM}]"
    with pytest.raises(QgsProcessingException, match="needs an embeddings raster"):
        run("fetchembeddings", {"SOURCE": 0, "EXTENT": extent, "OUTPUT": str(tmp_path / "a.tif")})
    with pytest.raises(QgsProcessingException, match="YEAR"):  # the parameter's range is core.choices' years
        run("fetchembeddings", {"SOURCE": 1, "EXTENT": extent, "YEAR": 2099, "OUTPUT": str(tmp_path / "b.tif")})
    feedback = QgsProcessingFeedback()
    feedback.cancel()
    with pytest.raises(QgsProcessingException, match="cancelled"):
        run("fetchembeddings", {"INPUT": str(small_scene.embeddings), "EXTENT": extent,
                                "OUTPUT": str(tmp_path / "c.tif")}, feedback)
    assert list(tmp_path.iterdir()) == []


def test_predict_writes_a_height_raster_on_the_embedding_grid(predicted, small_scene):
    layer = open_layer(predicted)
    assert layer.crs().authid() == UTM and layer.bandCount() == 1
    assert (layer.width(), layer.height()) == (small_scene.grid.width, small_scene.grid.height)
    left, bottom, right, top = small_scene.grid.bounds
    extent = layer.extent()
    assert (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()) == (left, bottom, right, top)
    with rasterio.open(predicted) as src:
        assert np.isfinite(src.read(1, masked=True)).any()


def test_cancelled_prediction_raises_and_leaves_no_file(run, small_scene, tiny_model, tmp_path):
    feedback = QgsProcessingFeedback()
    feedback.cancel()
    out = tmp_path / "height.tif"
    with pytest.raises(QgsProcessingException, match="(?i)cancelled"):
        run("predictheight", {"INPUT": str(small_scene.embeddings), "MODEL": str(tiny_model), "DEVICE": 1,
                              "OUTPUT": str(out)}, feedback)
    assert list(tmp_path.iterdir()) == []


def test_compare_outputs_match_the_metrics_file(run, predicted, small_scene, tmp_path):
    out, metrics_file = tmp_path / "diff.tif", tmp_path / "metrics.json"
    result = run("compareheights", {"PREDICTED": str(predicted), "REFERENCE": str(small_scene.reference),
                                    "OUTPUT": str(out), "METRICS": str(metrics_file)})
    layer = open_layer(out)
    assert layer.crs().authid() == UTM
    assert (layer.width(), layer.height()) == (small_scene.grid.width, small_scene.grid.height)
    overall = json.loads(metrics_file.read_text())["overall"]
    for name in ("R2", "RMSE", "MAE", "MEAN_DIFF", "MEDIAN_DIFF", "NMAD"):
        assert result[name] == pytest.approx(overall[name.lower()], rel=1e-12), name
    assert result["RMSE"] > 0


def test_predict_above_the_size_limit_needs_allow_large_areas(run, small_scene, tiny_model, tmp_path, monkeypatch):
    from alphaearth_height.plugin.core.sizes import MAX_MPX_ENV

    monkeypatch.setenv(MAX_MPX_ENV, "0.01")  # the 256 x 256 px scene is 0.066 Mpx
    out = tmp_path / "height.tif"
    params = {"INPUT": str(small_scene.embeddings), "MODEL": str(tiny_model), "DEVICE": 1, "OUTPUT": str(out)}
    with pytest.raises(QgsProcessingException, match=r"is 256 x 256 px .* above the limit of 0.01 Mpx.*"
                                                     r"Tick 'Allow large areas'"):
        run("predictheight", params)
    assert list(tmp_path.iterdir()) == []
    run("predictheight", {**params, "ALLOW_LARGE": True})
    assert out.exists()


def test_compare_takes_the_reference_band_it_is_given(run, predicted, small_scene, tmp_path):
    with rasterio.open(small_scene.reference) as src:
        profile, heights = src.profile, src.read(1)
    profile.update(count=2)
    stack = tmp_path / "stack.tif"
    with rasterio.open(stack, "w", **profile) as dst:
        dst.write(np.stack([heights + 1000, heights]))
    params = {"PREDICTED": str(predicted), "OUTPUT": str(tmp_path / "diff.tif"),
              "METRICS": str(tmp_path / "metrics.json")}
    with pytest.raises(QgsProcessingException, match="has 2 bands .*'Reference band'"):
        run("compareheights", {**params, "REFERENCE": str(stack)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.tif"]
    chosen = run("compareheights", {**params, "REFERENCE": str(stack), "REFERENCE_BAND": 2})
    single = run("compareheights", {**params, "REFERENCE": str(small_scene.reference)})
    assert chosen["RMSE"] == single["RMSE"] and chosen["MEDIAN_DIFF"] == single["MEDIAN_DIFF"]


def loaded_layer(path: Path) -> QgsRasterLayer:
    return next(layer for layer in QgsProject.instance().mapLayers().values() if Path(layer.source()) == path)


def test_outputs_loaded_into_qgis_get_the_dock_styles(provider, predicted, small_scene, tiny_model, tmp_path):
    """Run as from the toolbox (outputs loaded on completion): height and difference are styled
    like the dock's layers, not left in Processing's default grey."""
    import gc

    import processing
    from alphaearth_height.plugin.processing import base

    height, diff = tmp_path / "height.tif", tmp_path / "diff.tif"
    try:
        processing.runAndLoadResults("alphaearth_height:predictheight", {
            "INPUT": str(small_scene.embeddings), "MODEL": str(tiny_model), "BATCH_SIZE": 2, "DEVICE": 1,
            "OUTPUT": str(height)})
        gc.collect()  # the post-processor must survive until Processing calls it
        processing.runAndLoadResults("alphaearth_height:compareheights", {
            "PREDICTED": str(height), "REFERENCE": str(small_scene.reference), "OUTPUT": str(diff),
            "METRICS": str(tmp_path / "metrics.json")})
        height_layer, diff_layer = loaded_layer(height), loaded_layer(diff)
        for layer in (height_layer, diff_layer):
            assert isinstance(layer.renderer(), QgsSingleBandPseudoColorRenderer), layer.name()
        stats = height_layer.dataProvider().bandStatistics(1)
        assert height_layer.renderer().classificationMin() == pytest.approx(stats.minimumValue, abs=0.01)
        assert height_layer.renderer().classificationMax() == pytest.approx(stats.maximumValue, abs=0.01)
        low, high = diff_layer.renderer().classificationMin(), diff_layer.renderer().classificationMax()
        assert low == pytest.approx(-high) and high > 0
    finally:
        QgsProject.instance().removeAllMapLayers()
    with pytest.raises(ValueError):
        base.style_on_load(None, str(height), "grey")


@pytest.mark.parametrize("alg_id, input_name", [("predictheight", "INPUT"), ("fetchembeddings", "INPUT")])
def test_three_band_embeddings_fail_with_the_core_message(run, tiny_model, tmp_path, alg_id, input_name):
    bad = three_band_raster(tmp_path / "rgb.tif")
    out = tmp_path / "out.tif"
    params = {input_name: str(bad), "OUTPUT": str(out)}
    if alg_id == "predictheight":
        params.update(MODEL=str(tiny_model), DEVICE=1)
    else:
        params.update(EXTENT=f"690000,690100,4974800,4974900 [{UTM}]")
    with pytest.raises(QgsProcessingException, match=r"has 3 band\(s\) but embeddings need 64"):
        run(alg_id, params)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.tif"]


def test_missing_model_folder_fails_with_the_core_message(run, small_scene, tmp_path):
    out = tmp_path / "height.tif"
    with pytest.raises(QgsProcessingException, match="has no model.json"):
        run("predictheight", {"INPUT": str(small_scene.embeddings), "MODEL": str(tmp_path), "DEVICE": 1,
                              "OUTPUT": str(out)})
    assert not out.exists()


def test_predict_a_terrain_model_with_its_terrain(run, small_scene, terrain_model, scene_terrain, tiny_model,
                                                  tmp_path):
    from alphaearth_height.plugin.core.terrain import predict_surface

    params = {"INPUT": str(small_scene.embeddings), "MODEL": str(terrain_model), "BATCH_SIZE": 2, "DEVICE": 1,
              "OUTPUT": str(tmp_path / "height.tif")}
    with pytest.raises(QgsProcessingException, match="coarse terrain raster"):
        run("predictheight", params)
    with pytest.raises(QgsProcessingException, match="trained without a terrain input"):
        run("predictheight", {**params, "MODEL": str(tiny_model), "TERRAIN": str(scene_terrain)})
    assert list(tmp_path.iterdir()) == []
    run("predictheight", {**params, "TERRAIN": str(scene_terrain)})
    direct = predict_surface(small_scene.embeddings, terrain_model, tmp_path / "direct.tif", scene_terrain,
                             device="cpu", batch_size=2)
    with rasterio.open(tmp_path / "height.tif") as got, rasterio.open(direct.path) as want:
        assert got.tags()["TERRAIN"] == "terrain.tif"
        assert np.allclose(got.read(1), want.read(1), atol=1e-4)


def test_train_writes_a_model_that_loads(run, small_scene, tmp_path):
    out = tmp_path / "model"
    result = run("trainmodel", {"EMBEDDINGS": str(small_scene.embeddings), "REFERENCE": str(small_scene.reference),
                                "ARCH": 0, "ENCODER_DEPTH": 3, "PATCH_SIZE": 64, "BATCH_SIZE": 2, "EPOCHS": 1,
                                "STEPS_PER_EPOCH": 2, "DEVICE": 1, "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out)
    package = load_model(out)
    assert package.card["model"]["architecture"] == "unet"
    assert package.card["model"]["encoder_depth"] == 3
    assert np.isfinite(result["TEST_RMSE"])


def test_train_without_a_test_area(run, small_scene, tmp_path):
    """Test fraction 0 (the user tests on a separate area): trained, validated, no test figures."""
    result = run("trainmodel", {"EMBEDDINGS": str(small_scene.embeddings), "REFERENCE": str(small_scene.reference),
                                "ARCH": 0, "ENCODER_DEPTH": 3, "PATCH_SIZE": 64, "BATCH_SIZE": 2, "EPOCHS": 1,
                                "STEPS_PER_EPOCH": 1, "TEST_FRACTION": 0.0, "DEVICE": 1,
                                "OUTPUT": str(tmp_path / "model")})
    card = load_model(result["OUTPUT"]).card
    assert card["training"]["split"]["pixels"]["test"] == 0 and "test" not in card["metrics"]
    assert np.isfinite(result["VALIDATION_RMSE"]) and result.get("TEST_RMSE") is None


def test_cancel_offered_where_core_can_cancel(provider):
    from alphaearth_height.plugin.processing.compat import CAN_CANCEL

    cancellable = {alg.name(): bool(alg.flags() & CAN_CANCEL) for alg in provider.algorithms()}
    assert cancellable == {"compareheights": False, "correctbias": False, "fetchembeddings": True,
                           "predictheight": True, "trainmodel": False}


def test_fetch_over_the_size_limit_is_refused_unless_raised(run, small_scene, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_MAX_GB", "0.0001")  # 100 kB; the clip below is 100 x 80 px, 0.5 MB
    left, top = small_scene.grid.transform.c, small_scene.grid.transform.f
    out = tmp_path / "clip.tif"
    params = {"INPUT": str(small_scene.embeddings), "OUTPUT": str(out),
              "EXTENT": f"{left + 500},{left + 1500},{top - 1300},{top - 500} [{UTM}]"}
    with pytest.raises(QgsProcessingException, match=r"would write ~0.5 MB .* over the 0.0001 GB limit.*MAX_GB"):
        run("fetchembeddings", params)
    assert list(tmp_path.iterdir()) == []
    run("fetchembeddings", {**params, "MAX_GB": 0})  # 0: no limit
    assert out.exists()
    out.unlink()
    run("fetchembeddings", {**params, "MAX_GB": 1})
    assert out.exists()


@pytest.fixture(scope="module")
def shifted(small_scene, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 'prediction' that is the reference on the grid raised by 35 m, and that reference."""
    from rasterio.windows import Window

    from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA, float_profile
    from alphaearth_height.plugin.core.resample import ReferenceOnGrid

    grid = small_scene.grid
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        truth = ref.read(Window(0, 0, grid.width, grid.height))
    path = tmp_path_factory.mktemp("bias") / "shifted.tif"
    with rasterio.open(path, "w", **float_profile(grid)) as dst:
        dst.write(np.where(np.isfinite(truth), truth + 35.0, OUTPUT_NODATA).astype(np.float32), 1)
    return path, truth


def test_correct_bias_with_a_point_layer_in_another_crs(run, shifted, small_scene, tmp_path):
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsVectorLayer
    from rasterio.warp import transform

    from alphaearth_height.plugin.core.choices import BIAS_METHODS
    from alphaearth_height.plugin.core.compare import compare_heights

    path, truth = shifted
    rows, cols = np.random.default_rng(0).integers(20, 230, (2, 12))
    keep = np.isfinite(truth[rows, cols])
    xs, ys = small_scene.grid.transform * (cols[keep] + 0.5, rows[keep] + 0.5)
    lons, lats = transform(UTM, "EPSG:4326", list(xs), list(ys))
    layer = QgsVectorLayer("Point?crs=EPSG:4326&field=h:double", "heights", "memory")
    features = []
    for lon, lat, height in zip(lons, lats, truth[rows[keep], cols[keep]]):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(lon, lat)))
        feature.setAttribute("h", float(height))
        features.append(feature)
    assert layer.dataProvider().addFeatures(features)
    out = tmp_path / "corrected.tif"
    result = run("correctbias", {"PREDICTED": str(path), "POINTS": layer, "HEIGHT_FIELD": "h",
                                 "METHOD": BIAS_METHODS.index("offset"), "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out) and result["METHOD_USED"] == "offset"
    with rasterio.open(out) as src:
        assert json.loads(src.tags()["BIAS_CORRECTION"])["offset"] == pytest.approx(-35.0, abs=0.01)
    assert abs(compare_heights(out, small_scene.reference)["overall"]["median_diff"]) < 0.5


def test_correct_bias_with_a_reference_window_and_one_source_only(run, shifted, small_scene, tmp_path):
    path, _ = shifted
    out = tmp_path / "corrected.tif"
    params = {"PREDICTED": str(path), "REFERENCE": str(small_scene.reference), "WINDOW": "100 100 40 40",
              "OUTPUT": str(out)}
    result = run("correctbias", params)
    assert result["METHOD_USED"] in ("offset", "linear", "quantile")
    with rasterio.open(out) as src:
        assert src.tags()["BIAS_SAMPLES"] == "1600" and "window [100, 100, 40, 40]" in src.tags()["BIAS_SOURCE"]
    with pytest.raises(QgsProcessingException, match="needs exactly one source of reference heights"):
        run("correctbias", {**params, "REFERENCE": None, "OUTPUT": str(tmp_path / "none.tif")})
    with pytest.raises(QgsProcessingException, match="needs 4 whole numbers"):
        run("correctbias", {**params, "WINDOW": "100 100 40", "OUTPUT": str(tmp_path / "bad.tif")})


def test_predict_on_a_local_dask_cluster_equals_the_one_process_prediction(run, predicted, small_scene, tiny_model,
                                                                          tmp_path):
    """Processing's advanced 'Dask workers' runs the same prediction in chunks (core.distributed)."""
    pytest.importorskip("distributed")
    out = tmp_path / "height_dask.tif"
    feedback = Recorder()
    run("predictheight", {"INPUT": str(small_scene.embeddings), "MODEL": str(tiny_model), "BATCH_SIZE": 2,
                          "DEVICE": 1, "DASK_WORKERS": 2, "OUTPUT": str(out)}, feedback)
    assert any("Dask" in m and "chunks" in m for m in feedback.messages), feedback.messages
    with rasterio.open(predicted) as one, rasterio.open(out) as chunked:
        assert chunked.transform == one.transform and chunked.crs == one.crs
        a, b = one.read(1, masked=True), chunked.read(1, masked=True)
        assert np.array_equal(a.mask, b.mask) and np.abs(a - b).max() <= 0.01
