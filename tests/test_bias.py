"""Bias correction on a shifted synthetic area: a few reference heights remove most of the shift."""

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from alphaearth_height.plugin.core.compare import compare_heights
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.rasters import float_profile
from alphaearth_height.plugin.core.bias import choose_correction, correct_bias
from alphaearth_height.plugin.core.resample import ReferenceOnGrid


@pytest.fixture(scope="module")
def shifted(small_scene, tmp_path_factory):
    """A 'prediction' that is the reference compressed towards 200 m and shifted by +35 m, plus noise:
    the over-prediction of low and under-prediction of high ground the paper reports."""
    grid = small_scene.grid
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        truth = ref.read(Window(0, 0, grid.width, grid.height))
    noise = np.random.default_rng(3).normal(0, 4, truth.shape)
    predicted = 200 + 0.8 * (truth - 200) + 35 + noise
    path = tmp_path_factory.mktemp("bias") / "predicted.tif"
    with rasterio.open(path, "w", **float_profile(grid)) as dst:
        dst.write(np.where(np.isfinite(predicted), predicted, -9999).astype(np.float32), 1)
    return path


def test_a_reference_patch_removes_the_regional_bias(shifted, small_scene, tmp_path):
    out = tmp_path / "corrected.tif"
    result = correct_bias(shifted, out, reference=str(small_scene.reference), window=[150, 100, 40, 40],
                          check_reference=str(small_scene.reference))
    before, after = result.on_check["before"], result.on_check["after"]
    assert abs(before["median_diff"]) > 20
    assert abs(after["median_diff"]) < 0.25 * abs(before["median_diff"])
    assert after["rmse"] < before["rmse"]
    chosen = result.cv_rmse[result.correction.method]
    assert chosen == min(result.cv_rmse.values()) or chosen <= result.cv_rmse["offset"]
    with rasterio.open(out) as src:
        recorded = json.loads(src.tags()["BIAS_CORRECTION"])
        assert recorded["method"] == result.correction.method and src.tags()["BIAS_SAMPLES"] == "1600"
    assert compare_heights(out, small_scene.reference)["overall"]["median_diff"] == pytest.approx(after["median_diff"])


def test_a_few_points_in_a_csv_are_enough_for_an_offset(shifted, small_scene, tmp_path):
    grid = small_scene.grid
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        truth = ref.read(Window(0, 0, grid.width, grid.height))
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(20, 230, 8), rng.integers(20, 230, 8)
    xs, ys = grid.transform * (cols + 0.5, rows + 0.5)
    lines = ["x,y,height"] + [f"{x},{y},{truth[r, c]}" for x, y, r, c in zip(xs, ys, rows, cols)
                              if np.isfinite(truth[r, c])]
    points = tmp_path / "points.csv"
    points.write_text("\n".join(lines) + "\n")
    result = correct_bias(shifted, tmp_path / "c.tif", points=str(points), method="offset",
                          check_reference=str(small_scene.reference))
    assert result.samples == len(lines) - 1
    assert abs(result.on_check["after"]["median_diff"]) < 0.5 * abs(result.on_check["before"]["median_diff"])


def test_cross_validation_prefers_the_mapping_that_fits():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 500, 400)
    linear = choose_correction(0.7 * truth + 100 + rng.normal(0, 1, 400), truth)[0]
    offset = choose_correction(truth + 12 + rng.normal(0, 1, 400), truth)[0]
    assert linear.method in ("linear", "quantile") and offset.method in ("offset", "linear")
    assert np.abs(linear.apply(0.7 * truth + 100) - truth).mean() < 5
    flipped = choose_correction(-truth + rng.normal(0, 1, 400), truth)[0]
    assert flipped.method != "linear"  # an inverted map is never chosen automatically


def test_bad_points_file_is_one_line_and_writes_nothing(shifted, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("east,north\n1,2\n")
    with pytest.raises(InputError, match="x,y,height"):
        correct_bias(shifted, tmp_path / "c.tif", points=str(bad))
    assert not (tmp_path / "c.tif").exists()


def _points_on(grid, truth, n=8, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(20, 230, n), rng.integers(20, 230, n)
    xs, ys = grid.transform * (cols + 0.5, rows + 0.5)
    return [f"{x},{y},{truth[r, c]}" for x, y, r, c in zip(xs, ys, rows, cols) if np.isfinite(truth[r, c])]


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(shifted, small_scene, tmp_path):
    """Spreadsheets save UTF-8 CSVs with a BOM; the header must still read x,y,height."""
    grid = small_scene.grid
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        truth = ref.read(Window(0, 0, grid.width, grid.height))
    text = "\n".join(["X,Y,Height"] + _points_on(grid, truth)) + "\n"
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(text)
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    a = correct_bias(shifted, tmp_path / "a.tif", points=str(plain), method="offset")
    b = correct_bias(shifted, tmp_path / "b.tif", points=str(bom), method="offset")
    assert b.samples == a.samples > 0
    assert b.correction.params == a.correction.params


def test_points_outside_the_prediction_are_left_out_unless_none_is_inside(shifted, small_scene, tmp_path):
    grid = small_scene.grid
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        truth = ref.read(Window(0, 0, grid.width, grid.height))
    inside = _points_on(grid, truth)
    points = tmp_path / "points.csv"
    points.write_text("\n".join(["x,y,height", *inside, "0,0,10", "1e12,5,3"]) + "\n")
    assert correct_bias(shifted, tmp_path / "c.tif", points=str(points), method="offset").samples == len(inside)
    points.write_text("x,y,height\n0,0,10\n1e12,5,3\n")
    with pytest.raises(InputError, match="none of its 2 point"):
        correct_bias(shifted, tmp_path / "d.tif", points=str(points))
    assert not (tmp_path / "d.tif").exists()
