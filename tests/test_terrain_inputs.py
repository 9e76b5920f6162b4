"""The Copernicus DEM wherever a terrain input is accepted: fetch-terrain, --terrain copernicus-30 on
train / predict / evaluate, and the height job (the dock's run), against the 127.0.0.1 mirror of
tests/dem_mirror.py (heights bilinear in lon/lat, so the terrain on any grid is known exactly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from alphaearth_height.plugin.core import dem
from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.fetch.copernicus import aoi_grid
from alphaearth_height.plugin.core.resample import ReferenceOnGrid
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.metrics import height_metrics
from alphaearth_height.plugin.core.job import HeightJob, run_height_job
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA, Grid
from dem_mirror import build_dem_mirror, height
from range_server import RangeServer

CLI = Path(sys.executable).parent / "alphaearth-height"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("dem_mirror")
    return root, build_dem_mirror(root, keys=("copernicus-30",))


@pytest.fixture
def server(mirror):
    root, buckets = mirror
    with RangeServer(root) as srv:
        yield srv, f"{srv.url}/{buckets['copernicus-30']}"


def run(*args, cache):
    env = {**os.environ, "ALPHAEARTH_HEIGHT_CACHE": str(cache)}
    env.pop("ALPHAEARTH_HEIGHT_COPERNICUS_30_URL", None)
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def expected_terrain(grid: Grid) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols.ravel(), rows.ravel())
    lon, lat = transform_points(grid.crs, "EPSG:4326", xs, ys)
    return height(np.asarray(lon), np.asarray(lat)).reshape(cols.shape)


def read_grid(path) -> tuple[np.ndarray, dict, Grid]:
    with rasterio.open(path) as ds:
        return (ds.read(1, masked=True).filled(np.nan), ds.tags(),
                Grid(ds.crs, ds.transform, ds.width, ds.height))


def test_fetch_terrain_command(server, tmp_path, small_scene):
    srv, base = server
    out = tmp_path / "terrain.tif"
    result = run("fetch-terrain", "--aoi", -0.62, 44.80, -0.60, 44.81, "--out", out, "--base-url", base,
                 "--margin", 200, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "DLR e.V. 2010-2014" in result.stdout and "1 DEM tile(s) read" in result.stdout
    values, tags, grid = read_grid(out)
    wanted = aoi_grid(AreaOfInterest(-0.62, 44.80, -0.60, 44.81, "EPSG:4326"), 10.0, 200.0)
    assert grid == wanted and grid.crs.to_epsg() == 32630 and grid.transform.a == 10.0
    np.testing.assert_allclose(values, expected_terrain(grid), atol=0.01)
    assert tags["ATTRIBUTION"] == dem.ATTRIBUTION and tags["TERRAIN_PRODUCT"] == "copernicus-30"
    # --like: the embeddings' own grid grown by the margin (10 m lattice kept)
    like = tmp_path / "like.tif"
    result = run("fetch-terrain", "--like", small_scene.embeddings, "--out", like, "--base-url", base,
                 "--margin", 100, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    values, _, grid = read_grid(like)
    s = small_scene.grid
    assert grid.transform.c == s.transform.c - 100 and grid.transform.f == s.transform.f + 100
    assert (grid.width, grid.height) == (s.width + 20, s.height + 20)
    np.testing.assert_allclose(values, expected_terrain(grid), atol=0.01)


def test_fetch_terrain_bad_input_is_one_line(tmp_path, small_scene):
    result = run("fetch-terrain", "--aoi", 0, 0, 1, 1, "--like", small_scene.embeddings, "--out", tmp_path / "t.tif",
                 cache=tmp_path / "c")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--like" in result.stderr
    result = run("fetch-terrain", "--like", small_scene.embeddings, "--out", small_scene.embeddings,
                 cache=tmp_path / "c")
    assert result.returncode == 2 and "would be overwritten" in result.stderr
    # no server: one line that says the server could not be reached (never taken for open sea)
    result = run("fetch-terrain", "--aoi", -0.6, 44.8, -0.59, 44.81, "--out", tmp_path / "t.tif", "--base-url",
                 "http://127.0.0.1:9/dem", cache=tmp_path / "c")
    assert result.returncode == 2 and "could not be read (Failed to connect to 127.0.0.1 port 9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.tif").exists() and not list((tmp_path / "c").rglob("absent/*/*"))


def test_train_predict_evaluate_with_copernicus_terrain(server, tmp_path, small_scene):
    srv, base = server
    cache = tmp_path / "cache"
    model = tmp_path / "run"
    result = run("train", "--embeddings", small_scene.embeddings, "--reference", small_scene.reference,
                 "--out", model, "--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8",
                 "--patch-size", "64", "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "2",
                 "--terrain", "copernicus-30", "--dem-base-url", base, "--device", "cpu", cache=cache)
    assert result.returncode == 0, result.stderr
    card = json.loads((model / "model.json").read_text())
    assert card["target"]["relative_to"]["product"] == "copernicus-30"
    assert card["target"]["relative_to"]["attribution"] == dem.ATTRIBUTION
    assert json.loads((model / "config.json").read_text())["terrain"] == "copernicus-30"  # not made a path
    # the target was height above the DEM (~ 700 m here), not absolute height (~ 200 m)
    assert card["target"]["normalisation"]["mean"] < -300

    requests = len(srv.log.requests)
    out = tmp_path / "h.tif"
    result = run("predict", "--embeddings", small_scene.embeddings, "--model", model, "--out", out,
                 "--terrain", "copernicus-30", "--dem-base-url", base, "--device", "cpu", cache=cache)
    assert result.returncode == 0, result.stderr
    assert len(srv.log.requests) == requests  # the same grid: the terrain came from the cache
    surface, tags, grid = read_grid(out)
    assert grid == small_scene.grid
    assert tags["TERRAIN"] == "copernicus-30" and tags["TERRAIN_ATTRIBUTION"] == dem.ATTRIBUTION
    predict_height(small_scene.embeddings, model, tmp_path / "relief.tif", device="cpu", relative=True)
    relief, _, _ = read_grid(tmp_path / "relief.tif")
    ok = np.isfinite(surface)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(surface[ok] - relief[ok], expected_terrain(grid)[ok], atol=0.02)

    report = tmp_path / "report"
    result = run("evaluate", "--model", model, "--embeddings", small_scene.embeddings, "--reference",
                 small_scene.reference, "--out", report, "--terrain", "copernicus-30", "--dem-base-url", base,
                 "--device", "cpu", cache=cache)
    assert result.returncode == 0, result.stderr
    written = json.loads((report / "report.json").read_text())
    assert written["terrain"] == "copernicus-30" and written["terrain_name"] == "Copernicus DEM GLO-30"
    assert "terrain alone test" in result.stdout
    # the terrain-alone baseline is the DEM scored as a prediction on the same pixels as the model
    with rasterio.open(report / "prediction.tif") as ds:
        pred = ds.read(1, masked=True).filled(np.nan)
    with ReferenceOnGrid(small_scene.reference, small_scene.grid) as ref:
        reference = ref.read(Window(0, 0, small_scene.grid.width, small_scene.grid.height))
    valid = np.isfinite(pred) & np.isfinite(reference)
    whole = height_metrics(expected_terrain(small_scene.grid)[valid], reference[valid])
    got = written["overall_terrain"]
    assert got["n"] == whole["n"] and got["rmse"] == pytest.approx(whole["rmse"], abs=0.01)
    assert got["median_diff"] == pytest.approx(whole["median_diff"], abs=0.02)
    for area in ("train", "test"):
        assert written["areas"][area]["terrain"]["n"] == written["areas"][area]["model"]["n"] > 0
        assert [b["bin_min"] for b in written["areas"][area]["terrain_bins"]] == [
            b["bin_min"] for b in written["areas"][area]["model_bins"]]
    markdown = (report / "report.md").read_text()
    assert "| terrain alone test |" in markdown and "## Terrain alone by reference height, test area" in markdown

    # without the terrain the model is refused in one line that names what to give
    result = run("predict", "--embeddings", small_scene.embeddings, "--model", model, "--out", tmp_path / "x.tif",
                 "--device", "cpu", cache=cache)
    assert result.returncode == 2 and "copernicus-30" in result.stderr and not (tmp_path / "x.tif").exists()


def write_analytic_terrain(path: Path, grid: Grid) -> Path:
    """The mirror's heights on ``grid``, written directly (independent of the DEM code)."""
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="float32",
                       crs=grid.crs, transform=grid.transform) as dst:
        dst.write(expected_terrain(grid).astype(np.float32), 1)
    return path


def test_height_job_resolves_the_dem_for_its_area(server, tmp_path, small_scene, terrain_model, monkeypatch):
    """The dock's run: HeightJob(terrain="copernicus-30") fetches the DEM for the area it predicts (in the
    worker) and gives what the same job gives with the DEM's heights as a file."""
    srv, base = server
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_COPERNICUS_30_URL", base)
    g = small_scene.grid
    x0, y1 = g.transform.c, g.transform.f
    aoi = AreaOfInterest(x0 + 600, y1 - 1800, x0 + 1800, y1 - 600, "EPSG:32630")
    common = dict(embeddings=str(small_scene.embeddings), out_dir=str(tmp_path), model=str(terrain_model), aoi=aoi,
                  device="cpu", backend="torch", batch_size=2, cache_dir=str(tmp_path / "cache"), context=16)
    fetched = run_height_job(HeightJob(name="dem", terrain="copernicus-30", **common))
    assert any(r[1].endswith("N44_00_W001_00_DEM.tif") for r in srv.log.requests)
    surface, tags, grid = read_grid(fetched.predicted)
    assert (grid.width, grid.height) == (120, 120) and tags["TERRAIN"] == "copernicus-30"
    assert tags["TERRAIN_ATTRIBUTION"] == dem.ATTRIBUTION
    terrain_file = write_analytic_terrain(tmp_path / "analytic.tif", g)
    given = run_height_job(HeightJob(name="file", terrain=str(terrain_file), **common))
    expected, _, _ = read_grid(given.predicted)
    ok = np.isfinite(surface)
    assert ok.mean() > 0.9 and np.array_equal(ok, np.isfinite(expected))
    np.testing.assert_allclose(surface[ok], expected[ok], atol=0.02)
    assert OUTPUT_NODATA not in surface


def test_height_job_reports_the_terrain_alone_baseline(server, tmp_path, small_scene, terrain_model, monkeypatch):
    """The dock's figures (compare step of the job): the DEM scored like the prediction, on its pixels."""
    srv, base = server
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_COPERNICUS_30_URL", base)
    g = small_scene.grid
    aoi = AreaOfInterest(g.transform.c + 300, g.transform.f - 2000, g.transform.c + 2000, g.transform.f - 300,
                         "EPSG:32630")
    job = HeightJob(embeddings=str(small_scene.embeddings), out_dir=str(tmp_path), model=str(terrain_model), aoi=aoi,
                    reference=str(small_scene.reference), device="cpu", backend="torch", batch_size=2,
                    cache_dir=str(tmp_path / "cache"), terrain="copernicus-30")
    result = run_height_job(job)
    baseline = result.metrics["baselines"]["terrain alone"]
    assert baseline["name"] == "Copernicus DEM GLO-30"
    surface, _, grid = read_grid(result.predicted)
    with ReferenceOnGrid(small_scene.reference, grid) as ref:
        reference = ref.read(Window(0, 0, grid.width, grid.height))
    valid = np.isfinite(surface) & np.isfinite(reference)
    want = height_metrics(expected_terrain(grid)[valid], reference[valid])
    assert baseline["overall"]["n"] == want["n"] == result.metrics["overall"]["n"]
    assert baseline["overall"]["rmse"] == pytest.approx(want["rmse"], abs=0.01)
    assert [b["bin_min"] for b in baseline["bins"]] == [b["bin_min"] for b in result.metrics["bins"]]
    on_disk = json.loads(result.metrics_file.read_text())
    assert on_disk["baselines"]["terrain alone"]["overall"]["n"] == want["n"]
