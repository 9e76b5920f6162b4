"""The experiment's coarse-DEM additions: synthetic stand-ins for the Copernicus DEM over the demo
scene, a terrain-relative U-Net++ and the "terrain alone" rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as transform_points

from alphaearth_height.plugin.core.demo_scene import COARSE_DEMS, write_coarse_dems
from alphaearth_height.training.experiment import ExperimentBudget, run_experiment


def test_coarse_dems_are_the_reference_averaged_on_arcsecond_pixels(small_scene, tmp_path):
    dems = write_coarse_dems(small_scene, tmp_path)
    with rasterio.open(small_scene.reference) as ref:
        dsm = ref.read(1, masked=True)
        rows, cols = np.nonzero(~dsm.mask)
        xs, ys = ref.transform * (cols + 0.5, rows + 0.5)
        lon, lat = (np.asarray(v) for v in transform_points(ref.crs, "EPSG:4326", xs, ys))
        values = dsm.data[rows, cols].astype(np.float64)
    for key, path in dems.items():
        arcsec = COARSE_DEMS[key][1]
        with rasterio.open(path) as ds:
            dem, t = ds.read(1, masked=True), ds.transform
            assert ds.crs.to_epsg() == 4326 and t.a == pytest.approx(arcsec / 3600) and t.e == pytest.approx(
                -arcsec / 3600)
            # pixel centres on whole multiples of the pixel size (pixel-is-point, as the published tiles)
            assert (t.c + t.a / 2) / t.a == pytest.approx(round((t.c + t.a / 2) / t.a), abs=1e-6)
            assert "not Copernicus data" in ds.tags()["SOURCE"]
        # the mean of the 5 m reference pixels whose centres fall in each DEM pixel, computed here
        c, r = np.floor((lon - t.c) / t.a).astype(int), np.floor((lat - t.f) / t.e).astype(int)
        flat = r * dem.shape[1] + c
        counts = np.bincount(flat, minlength=dem.size)
        means = np.bincount(flat, weights=values, minlength=dem.size) / np.maximum(counts, 1)
        full = (counts >= 0.9 * counts.max()).reshape(dem.shape) & ~dem.mask  # pixels wholly inside the scene
        error = dem.data[full] - means.reshape(dem.shape)[full]
        assert full.sum() > 50
        assert abs(error.mean()) < 0.5 and 1.5 < error.std() < 2.8  # the 2 m noise, little else


def test_experiment_rows_with_a_coarse_dem(tmp_path):
    budget = ExperimentBudget(scene_size=192, encoder_depth=3, decoder_channels=(32, 16, 8), patch_size=64,
                              batch_size=2, epochs=1, steps_per_epoch=1)
    result = run_experiment(tmp_path / "exp", budget, log=lambda message: None)
    rows = result["rows"]
    assert list(rows) == ["U-Net", "U-Net++", "U-Net++ + coarse DEM 30 m", "ridge (per pixel)",
                          "terrain alone (coarse DEM 30 m)", "terrain alone (coarse DEM 90 m)"]
    # the terrain-alone row and the terrain-relative run's own evaluation agree (two computations)
    report = json.loads((tmp_path / "exp" / "unetplusplus_dem30" / "evaluation" / "report.json").read_text())
    for area in ("train", "test"):
        assert rows["terrain alone (coarse DEM 30 m)"][f"{area}_rmse"] == pytest.approx(
            report["areas"][area]["terrain"]["rmse"], rel=1e-9)
    card = json.loads((tmp_path / "exp" / "unetplusplus_dem30" / "model.json").read_text())
    assert card["target"]["relative_to"]["file"] == "coarse_dem_30m.tif"
    # a coarser DEM is a weaker baseline
    assert rows["terrain alone (coarse DEM 90 m)"]["test_rmse"] > rows["terrain alone (coarse DEM 30 m)"]["test_rmse"]
    # each net's calibrated interval is scored on the test area; baselines have no interval
    assert card["uncertainty"]["k"] > 0 and card["uncertainty"]["test_coverage"] == pytest.approx(
        rows["U-Net++ + coarse DEM 30 m"]["test_coverage_90"])
    assert report["uncertainty_interval"]["coverage"]["test"] == rows["U-Net++ + coarse DEM 30 m"]["test_coverage_90"]
    assert all(0 < rows[label]["test_coverage_90"] <= 1 for label in ("U-Net", "U-Net++"))
    assert "test_coverage_90" not in rows["ridge (per pixel)"]
    assert not (tmp_path / "exp" / "unetplusplus" / "evaluation" / "uncertainty.tif").exists()  # keep_rasters off
    table = (tmp_path / "exp" / "comparison.md").read_text()
    assert "test_coverage_90" in table and "| terrain alone (coarse DEM 90 m) |" in table and (tmp_path / "exp" / "error_by_height.png").is_file()
