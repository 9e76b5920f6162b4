import numpy as np
import rasterio
from rasterio.windows import Window

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.demo_scene import generate_demo_scene, smooth_field
from alphaearth_height.plugin.core.metrics import height_metrics
from alphaearth_height.plugin.core.rasters import EmbeddingRaster
from alphaearth_height.training.baseline import RidgeBaseline, pixels
from alphaearth_height.training.data import load_pair


def test_scene_is_aef_shaped_and_deterministic(small_scene, tmp_path):
    with rasterio.open(small_scene.embeddings) as src:
        assert src.count == 64 and src.dtypes[0] == "int8" and src.nodata == aef.NODATA_INT8
        assert src.crs.to_string() == "EPSG:32630" and src.res == (10.0, 10.0)
        assert src.descriptions[0] == "A00" and src.descriptions[63] == "A63"
        raw = src.read()
    holes = (raw == aef.NODATA_INT8).all(axis=0)
    assert 0 < holes.mean() < 0.2
    assert ((raw == aef.NODATA_INT8).any(axis=0) == holes).all()  # nodata in all bands at once
    with EmbeddingRaster(small_scene.embeddings) as src:
        values = src.read(Window(0, 0, 256, 256))
    norms = np.linalg.norm(values[:, ~holes], axis=0)
    assert np.abs(norms - 1).max() < 0.03  # unit length up to int8 quantisation
    again = generate_demo_scene(tmp_path, width=256, height=256, seed=7)
    with rasterio.open(again.embeddings) as a, rasterio.open(again.reference) as b, \
            rasterio.open(small_scene.reference) as ref:
        np.testing.assert_array_equal(a.read(), raw)
        np.testing.assert_array_equal(b.read(), ref.read())


def test_reference_is_lambert93_at_5m_and_the_test_side_is_higher(small_scene):
    with rasterio.open(small_scene.reference) as ref:
        assert ref.crs.to_string() == "EPSG:2154" and ref.res == (5.0, 5.0)
    pair = load_pair(small_scene.embeddings, small_scene.reference)
    train = np.nanmean(pair.reference[small_scene.train_window.toslices()])
    test = np.nanmean(pair.reference[small_scene.test_window.toslices()])
    assert test > train + 10


def test_height_is_in_the_context_more_than_in_the_pixel(tmp_path):
    scene = generate_demo_scene(tmp_path, width=384, height=384, seed=11)
    pair = load_pair(scene.embeddings, scene.reference)
    x = np.nan_to_num(pair.embeddings)
    context = np.concatenate([x, np.stack([smooth_field(b, 6.0) for b in x])])
    scores = {}
    for name, features in (("pixel", pair.embeddings), ("context", context)):
        train, test = (np.zeros_like(pair.label_mask) for _ in range(2))
        train[scene.train_window.toslices()] = pair.label_mask[scene.train_window.toslices()]
        test[scene.test_window.toslices()] = pair.label_mask[scene.test_window.toslices()]
        model = RidgeBaseline().fit(*pixels(features, pair.reference, train))
        fx, fy = pixels(features, pair.reference, test)
        scores[name] = height_metrics(model.predict(fx), fy)["r2"]
    assert scores["context"] > scores["pixel"] + 0.2
