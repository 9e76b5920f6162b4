import json
import os
import stat

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform, transform_bounds

from alphaearth_height.plugin.core import plots
from alphaearth_height.plugin.core.compare import compare_heights
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA

from conftest import ORIGIN

X0, Y0 = ORIGIN


def plane(x, y):
    return 100.0 + 0.01 * (x - X0) - 0.02 * (y - Y0)


def write_predicted(path, size=64, offset=0.0):
    rows, cols = np.mgrid[0:size, 0:size]
    x, y = X0 + 10 * cols + 5, Y0 - 10 * rows - 5
    data = (plane(x, y) + offset).astype(np.float32)
    data[:4, :4] = OUTPUT_NODATA
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32",
                       crs="EPSG:32630", transform=Affine(10, 0, X0, 0, -10, Y0), nodata=OUTPUT_NODATA) as dst:
        dst.write(data, 1)
    return path


def write_reference(path, shift=(0.0, 0.0), res=5.0, nodata_corner=True):
    """The same plane sampled on a Lambert-93 grid (IGN's CRS) at ``res`` metres."""
    left, bottom, right, top = transform_bounds("EPSG:32630", "EPSG:2154", X0 - 50, Y0 - 690, X0 + 690, Y0 + 50)
    width, height = int((right - left) / res) + 1, int((top - bottom) / res) + 1
    left, top = left + shift[0], top + shift[1]
    rows, cols = np.mgrid[0:height, 0:width]
    lx, ly = left + res * (cols + 0.5), top - res * (rows + 0.5)
    ux, uy = warp_transform("EPSG:2154", "EPSG:32630", lx.ravel(), ly.ravel())
    data = plane(np.array(ux), np.array(uy)).reshape(height, width).astype(np.float32)
    if nodata_corner:
        data[-20:, -20:] = -32768.0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       crs="EPSG:2154", transform=Affine(res, 0, left, 0, -res, top), nodata=-32768.0) as dst:
        dst.write(data, 1)
    return path


def test_reference_in_another_crs_is_reprojected_onto_the_prediction_grid(tmp_path):
    pred = write_predicted(tmp_path / "pred.tif", offset=3.0)
    ref = write_reference(tmp_path / "ref.tif")
    result = compare_heights(pred, ref, tmp_path / "diff.tif", tmp_path / "m.json")
    assert result["reference_resampling"] == "average"  # 5 m -> 10 m
    overall = result["overall"]
    assert overall["median_diff"] == pytest.approx(3.0, abs=0.05)
    assert overall["nmad"] < 0.1 and overall["pearson"] > 0.999
    with rasterio.open(tmp_path / "diff.tif") as src:
        diff = src.read(1)
        assert src.crs.to_string() == "EPSG:32630" and src.transform == Affine(10, 0, X0, 0, -10, Y0)
        assert src.nodata == OUTPUT_NODATA and src.descriptions[0] == "predicted minus reference height"
        assert "CC-BY 4.0" in src.tags()["ATTRIBUTION"]
    assert (diff[:4, :4] == OUTPUT_NODATA).all()  # prediction nodata
    valid = diff != OUTPUT_NODATA
    assert overall["n"] == valid.sum()
    np.testing.assert_allclose(diff[valid].mean(), 3.0, atol=0.05)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["overall"]["n"] == overall["n"] and saved["bins"]


def test_coarse_reference_is_interpolated(tmp_path):
    pred = write_predicted(tmp_path / "pred.tif")
    ref = write_reference(tmp_path / "ref.tif", res=20.0, nodata_corner=False)
    result = compare_heights(pred, ref)
    assert result["reference_resampling"] == "bilinear"
    assert abs(result["overall"]["median_diff"]) < 0.5


def test_no_overlap_is_an_error_and_writes_nothing(tmp_path):
    pred = write_predicted(tmp_path / "pred.tif")
    far = write_reference(tmp_path / "far.tif", shift=(50_000.0, 0.0))
    with pytest.raises(InputError, match="does not overlap the target area"):
        compare_heights(pred, far, tmp_path / "diff.tif", tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.tif", "pred.tif"]


def test_reference_without_valid_pixels_is_an_error_and_writes_nothing(tmp_path):
    pred = write_predicted(tmp_path / "pred.tif")
    ref = tmp_path / "empty.tif"
    with rasterio.open(ref, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32", crs="EPSG:32630",
                       transform=Affine(80, 0, X0, 0, -80, Y0), nodata=-1.0) as dst:
        dst.write(np.full((1, 8, 8), -1.0, dtype=np.float32))
    with pytest.raises(InputError, match="has no valid pixel"):
        compare_heights(pred, ref, tmp_path / "diff.tif", tmp_path / "m.json")
    assert not (tmp_path / "diff.tif").exists() and not (tmp_path / "m.json").exists()


def legend_labels(monkeypatch) -> list[str]:
    """Record the labels of the lines the plots draw (the median's legend entry among them)."""
    from matplotlib.axes import Axes

    labels: list[str] = []
    axvline = Axes.axvline

    def recording(self, *args, **kwargs):
        labels.append(kwargs.get("label", ""))
        return axvline(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "axvline", recording)
    return labels


def test_histogram_label_is_the_metrics_median(tmp_path, monkeypatch):
    """The plot must not compute its own median (from a sample, in float32): one number everywhere."""
    labels = legend_labels(monkeypatch)
    predicted = write_predicted(tmp_path / "pred.tif", offset=1.75)
    reference = write_reference(tmp_path / "ref.tif")
    result = compare_heights(predicted, reference, tmp_path / "diff.tif", tmp_path / "metrics.json",
                             plots_prefix=str(tmp_path / "run"))
    median = json.loads((tmp_path / "metrics.json").read_text())["overall"]["median_diff"]
    assert median == result["overall"]["median_diff"]
    assert f"median {median:+.2f} m" in labels


def test_histogram_label_takes_the_median_it_is_given(tmp_path, monkeypatch):
    labels = legend_labels(monkeypatch)
    diff = np.linspace(-1.0, 3.0, 1001)
    plots.render_accuracy_plots(diff + 10.0, np.full_like(diff, 10.0), str(tmp_path / "p"), {"median_diff": 1.76})
    assert np.median(diff) == pytest.approx(1.0)
    assert "median +1.76 m" in labels


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        predicted = write_predicted(tmp_path / "pred.tif")
        compare_heights(predicted, write_reference(tmp_path / "ref.tif"), tmp_path / "diff.tif",
                        tmp_path / "metrics.json")
    finally:
        os.umask(old)
    for name in ("diff.tif", "metrics.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_a_reference_with_several_bands_needs_the_band_named(tmp_path):
    """Band 1 of a multi-band raster is not taken silently; --reference-band picks the heights."""
    predicted = write_predicted(tmp_path / "pred.tif")
    single = write_reference(tmp_path / "ref.tif")
    with rasterio.open(single) as src:
        profile, heights = src.profile, src.read(1)
    heights[40:60, 40:60] = profile["nodata"]  # a hole in the heights band only, inside the predicted area
    with rasterio.open(single, "w", **profile) as dst:
        dst.write(heights, 1)
    profile.update(count=3)
    with rasterio.open(tmp_path / "stack.tif", "w", **profile) as dst:
        dst.write(np.stack([np.full_like(heights, 5000.0), heights, -heights]))
    with pytest.raises(InputError, match="has 3 bands but a height raster has one"):
        compare_heights(predicted, tmp_path / "stack.tif", tmp_path / "diff.tif")
    with pytest.raises(InputError, match="reference band 4: is not a band of .* which has 3"):
        compare_heights(predicted, tmp_path / "stack.tif", tmp_path / "diff.tif", reference_band=4)
    assert not (tmp_path / "diff.tif").exists()
    chosen = compare_heights(predicted, tmp_path / "stack.tif", reference_band=2)["overall"]
    assert chosen == compare_heights(predicted, single)["overall"]
    assert abs(chosen["median_diff"]) < 1.0
