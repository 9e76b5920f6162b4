import json
import threading

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import Cancelled, blend_weights, predict_height, tile_starts
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA

from conftest import ORIGIN, unit_embeddings, write_embeddings


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile, src.tags(), src.tags(1), src.descriptions


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pred")
    values = unit_embeddings(200, 232, seed=3)
    values[:, 150:160, 20:40] = np.nan  # a nodata hole
    return write_embeddings(folder / "emb.tif", values), values


def test_tile_plan_covers_and_ends_flush():
    assert tile_starts(200, 64, 48) == [0, 48, 96, 136]
    assert tile_starts(50, 64, 48) == [0]
    w = blend_weights(64, 64, 16)
    assert w.max() == 1.0 and w.min() > 0 and w[0, 0] < 0.01 and w[32, 32] == 1.0


def test_output_is_georeferenced_on_the_embedding_grid(scene, tiny_model, tmp_path):
    path, values = scene
    out = tmp_path / "h.tif"
    result = predict_height(path, tiny_model, out, device="cpu")
    data, profile, tags, band_tags, descriptions = _read(out)
    assert profile["crs"].to_string() == "EPSG:32630"
    assert profile["transform"] == rasterio.Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1])
    assert (profile["width"], profile["height"]) == (232, 200)
    assert profile["dtype"] == "float32" and profile["nodata"] == OUTPUT_NODATA
    assert profile["tiled"] and profile["compress"] == "deflate"
    assert (data[150:160, 20:40] == OUTPUT_NODATA).all()
    assert (data != OUTPUT_NODATA).sum() == 200 * 232 - 200
    assert "AlphaEarth" in tags["ATTRIBUTION"] and "CC-BY 4.0" in tags["ATTRIBUTION"]
    assert tags["MODEL"] == "tiny test U-Net"
    assert band_tags["UNITS"] == "m" and descriptions[0] == "predicted surface height"
    assert float(band_tags["STATISTICS_MINIMUM"]) <= float(band_tags["STATISTICS_MAXIMUM"])
    assert result.tiles == len(tile_starts(200, 64, 48)) * len(tile_starts(232, 64, 48))


def test_bottom_up_input_gives_the_same_north_up_output(scene, tiny_model, tmp_path):
    _, values = scene
    north = write_embeddings(tmp_path / "north.tif", values)
    south = write_embeddings(tmp_path / "south.tif", values, bottom_up=True)
    predict_height(north, tiny_model, tmp_path / "a.tif", device="cpu")
    predict_height(south, tiny_model, tmp_path / "b.tif", device="cpu")
    a, pa, *_ = _read(tmp_path / "a.tif")
    b, pb, *_ = _read(tmp_path / "b.tif")
    assert pa["transform"] == pb["transform"] and pb["transform"].e < 0
    np.testing.assert_array_equal(a, b)


def _seam_ratio(data, starts, tile):
    """Mean |jump| across the columns where tiles end, over the mean |jump| elsewhere."""
    jumps = np.abs(np.diff(data, axis=1))
    edges = sorted({s + tile - 1 for s in starts[:-1]} | {s - 1 for s in starts[1:]})
    inner = np.setdiff1d(np.arange(jumps.shape[1]), edges)
    return jumps[:, edges].mean() / jumps[:, inner].mean()


def test_tiled_prediction_has_no_seam_and_matches_one_window(tiny_model, tmp_path):
    values = unit_embeddings(96, 224, seed=5)
    path = write_embeddings(tmp_path / "e.tif", values)
    predict_height(path, tiny_model, tmp_path / "whole.tif", tile=224, overlap=0, device="cpu")
    predict_height(path, tiny_model, tmp_path / "tiled.tif", tile=96, overlap=32, device="cpu")
    predict_height(path, tiny_model, tmp_path / "hard.tif", tile=96, overlap=0, device="cpu")
    whole, tiled, hard = (_read(tmp_path / f"{n}.tif")[0] for n in ("whole", "tiled", "hard"))
    starts = tile_starts(224, 96, 64)
    assert _seam_ratio(tiled, starts, 96) < 1.5
    assert _seam_ratio(hard, tile_starts(224, 96, 96), 96) > _seam_ratio(tiled, starts, 96)
    spread = whole.std()
    assert np.abs(tiled - whole).mean() < np.abs(hard - whole).mean()
    # Where one tile sees all the context the network uses, tiling changes nothing.
    predict_height(path, tiny_model, tmp_path / "wide.tif", tile=160, overlap=64, device="cpu")
    wide = _read(tmp_path / "wide.tif")[0]
    np.testing.assert_allclose(wide[:, :24], whole[:, :24], atol=1e-3 * spread)
    np.testing.assert_allclose(wide[:, -24:], whole[:, -24:], atol=1e-3 * spread)


def test_column_bands_give_the_same_result(scene, tiny_model, tmp_path):
    path, _ = scene
    predict_height(path, tiny_model, tmp_path / "one.tif", device="cpu")
    predict_height(path, tiny_model, tmp_path / "bands.tif", device="cpu", band_width=100, batch_size=3)
    np.testing.assert_allclose(_read(tmp_path / "bands.tif")[0], _read(tmp_path / "one.tif")[0], atol=1e-4)


def test_cancel_leaves_no_output(scene, tiny_model, tmp_path):
    path, _ = scene
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu", batch_size=1, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, expected", [
    ({"tile": 60}, "is not a positive multiple of 8"),
    ({"overlap": 40}, "must be between 0 and half the tile"),
    ({"batch_size": 0}, "must be at least 1"),
    ({"device": "cuda:7"}, "PyTorch sees no CUDA GPU"),
])
def test_bad_settings_are_refused_without_output(scene, tiny_model, tmp_path, kwargs, expected):
    path, _ = scene
    with pytest.raises(InputError, match=expected):
        predict_height(path, tiny_model, tmp_path / "h.tif", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_and_overwriting_input_are_refused(scene, tiny_model, tmp_path):
    path, _ = scene
    with pytest.raises(InputError, match="does not exist"):
        predict_height(path, tiny_model, tmp_path / "nope" / "h.tif")
    with pytest.raises(InputError, match="is also an input"):
        predict_height(path, tiny_model, path)


@pytest.mark.parametrize("case", ["bands", "geographic", "unreadable", "broken_model", "pickle"])
def test_bad_inputs_leave_no_output_file(scene, tiny_model, tmp_path, case):
    embeddings, values = scene
    model = tiny_model
    if case == "bands":
        embeddings = write_embeddings(tmp_path / "in.tif", values[:5], quantised=False)
    elif case == "geographic":
        embeddings = write_embeddings(tmp_path / "in.tif", values, crs="EPSG:4326", origin=(-0.5, 44.9))
    elif case == "unreadable":
        embeddings = tmp_path / "in.tif"
        embeddings.write_bytes(b"GIF89a not a raster")
    elif case == "broken_model":
        model = tmp_path / "model"
        model.mkdir()
        (model / "model.json").write_text("{")
    elif case == "pickle":
        model = tmp_path / "model.pth"
        model.write_bytes(b"\x80\x04K\x01.")
    before = set(tmp_path.iterdir())
    with pytest.raises(InputError):
        predict_height(embeddings, model, tmp_path / "h.tif", device="cpu")
    assert set(tmp_path.iterdir()) == before
