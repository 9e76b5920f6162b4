"""AOI edges: the height job predicts with context around the AOI, then crops to the AOI.

Measured on a 512 x 512 demo scene with the bundled model: without context, a 320 px
AOI's predictions within 4 px of its edge are off from the whole-scene prediction by
tens of metres on average; with 64 px of context the edge is as close as the interior.
(The interior itself differs by ~1 m on average, up to ~15 m at single pixels, because
the AOI and the whole scene are cut into different inference tiles.)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS

from alphaearth_height.plugin.core.aoi import AreaOfInterest
from alphaearth_height.plugin.core.demo_scene import generate_demo_scene
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import context_grids
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.job import HeightJob, HeightJobResult, run_height_job
from alphaearth_height.plugin.core.models import bundled_model_dir, load_model
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA, Grid, crop_to_grid, grow_grid
from conftest import UTM

SIZE, AOI_PX, EDGE_PX = 512, 320, 4


@pytest.fixture(scope="module")
def bundled():
    return load_model(bundled_model_dir())


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_demo_scene(tmp_path_factory.mktemp("scene512"), width=SIZE, height=SIZE, seed=11)


@pytest.fixture(scope="module")
def whole(scene, bundled, tmp_path_factory):
    """The whole-scene prediction, as a (h, w) array with NaN for nodata."""
    out = tmp_path_factory.mktemp("whole") / "whole.tif"
    predict_height(scene.embeddings, bundled, out, device="cpu")
    with rasterio.open(out) as ds:
        return ds.read(1, masked=True).filled(np.nan)


def pixel_aoi(scene, col: int, row: int, size: int = AOI_PX) -> AreaOfInterest:
    """An AOI whose outward-snapped window is exactly (col, row, size, size) of the scene grid."""
    t = scene.grid.transform
    x0, y0 = t * (col + 0.3, row + 0.2)
    x1, y1 = t * (col + size - 0.4, row + size - 0.1)
    return AreaOfInterest(x0, y1, x1, y0, UTM)


def run_aoi(scene, bundled, out_dir, col, row, **changes):
    job = HeightJob(embeddings=str(scene.embeddings), out_dir=str(out_dir), aoi=pixel_aoi(scene, col, row),
                    name="aoi", device="cpu", **changes)
    return run_height_job(job, package=bundled)


def edge_error(result, whole, col, row) -> tuple[float, float]:
    """Mean and max |AOI - whole scene| within EDGE_PX of the AOI's edge."""
    with rasterio.open(result.predicted) as ds:
        aoi = ds.read(1, masked=True).filled(np.nan)
    h, w = aoi.shape
    diff = np.abs(aoi - whole[row:row + h, col:col + w])
    rows, cols = np.mgrid[0:h, 0:w]
    dist = np.minimum(np.minimum(rows, h - 1 - rows), np.minimum(cols, w - 1 - cols))
    band = (dist < EDGE_PX) & np.isfinite(diff)
    assert band.sum() > 0.9 * 2 * EDGE_PX * (h + w - 2 * EDGE_PX)  # a few nodata holes at most
    return float(diff[band].mean()), float(diff[band].max())


def check_grid(result, scene, col, row, size=AOI_PX):
    t = scene.grid.transform
    with rasterio.open(result.predicted) as ds:
        assert ds.crs == CRS.from_string(UTM) and (ds.width, ds.height) == (size, size)
        assert ds.transform == t * t.translation(col, row) and ds.transform.e < 0 and ds.transform.b == 0
        assert ds.nodata == OUTPUT_NODATA
        values, tags = ds.read(1, masked=True), ds.tags(1)  # statistics of the AOI, not of the margin
        assert float(tags["STATISTICS_MAXIMUM"]) == pytest.approx(values.max(), abs=1e-3)
        assert float(tags["STATISTICS_MINIMUM"]) == pytest.approx(values.min(), abs=1e-3)
        assert int(tags["VALID_PIXELS"]) == values.count()
        assert ds.tags()["SOURCE_EMBEDDINGS"] == result.embeddings.name
    with rasterio.open(result.embeddings) as ds:  # the AOI-only embeddings, on the same grid
        assert (ds.width, ds.height, ds.count, ds.transform) == (size, size, 64, t * t.translation(col, row))


def test_context_makes_the_aoi_edge_match_the_whole_scene(scene, bundled, whole, tmp_path):
    col, row = 96, 128
    (tmp_path / "ctx").mkdir()
    (tmp_path / "none").mkdir()
    with_context = run_aoi(scene, bundled, tmp_path / "ctx", col, row)
    without = run_aoi(scene, bundled, tmp_path / "none", col, row, context=0)
    check_grid(with_context, scene, col, row)
    check_grid(without, scene, col, row)
    assert with_context.context == 64 and without.context == 0
    mean_ctx, max_ctx = edge_error(with_context, whole, col, row)
    mean_none, max_none = edge_error(without, whole, col, row)
    print(f"edge (<{EDGE_PX} px) |AOI - whole|: context 64 mean {mean_ctx:.2f} max {max_ctx:.2f} m; "
          f"context 0 mean {mean_none:.2f} max {max_none:.2f} m")
    assert mean_ctx <= 1.5
    assert mean_none > 5.0 and mean_none > 5 * mean_ctx and max_none > max_ctx
    for folder in ("ctx", "none"):  # only the two outputs; no margin files left over
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["aoi_embeddings.tif", "aoi_height.tif"]


def test_aoi_at_the_scene_edge_gets_the_context_there_is(scene, bundled, whole, tmp_path):
    col, row = 0, SIZE - AOI_PX  # touches the west and south edges: the margin is clipped there
    result = run_aoi(scene, bundled, tmp_path, col, row)
    check_grid(result, scene, col, row)
    mean_error, _ = edge_error(result, whole, col, row)
    assert mean_error <= 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aoi_embeddings.tif", "aoi_height.tif"]


def test_model_card_context_and_bad_values(scene, bundled, tmp_path):
    card = {**bundled.card, "inference": {**bundled.card["inference"], "context": 0}}
    package = dataclasses.replace(bundled, card=card)
    job = HeightJob(embeddings=str(scene.embeddings), out_dir=str(tmp_path), aoi=pixel_aoi(scene, 200, 200, 40),
                    device="cpu")
    assert run_height_job(job, package=package).context == 0
    job.context = 16  # the job's value wins over the card's
    assert run_height_job(job, package=package).context == 16
    job.context = -1
    with pytest.raises(InputError, match="negative"):
        run_height_job(job, package=package)


def test_remote_sources_fetch_the_larger_area_unclipped(scene):
    aoi = pixel_aoi(scene, 0, 0, 100)  # at the scene's corner: a remote source is not clipped there
    inner, grown = context_grids(aoi, "cog", 64)
    t = scene.grid.transform
    assert inner == Grid(CRS.from_string(UTM), t, 100, 100)
    assert grown == Grid(CRS.from_string(UTM), t * t.translation(-64, -64), 228, 228)
    inner, grown = context_grids(aoi, "local", 64, raster=str(scene.embeddings))
    assert inner.transform == t and grown == Grid(inner.crs, t, 164, 164)


def test_crop_to_grid_refuses_grids_off_the_lattice_or_outside(scene, tmp_path):
    grid = scene.grid
    crop = Grid(grid.crs, grid.window_transform(rasterio.windows.Window(10, 20, 30, 40)), 30, 40)
    out = crop_to_grid(scene.embeddings, tmp_path / "crop.tif", crop)
    with rasterio.open(out) as ds, rasterio.open(scene.embeddings) as src:
        assert ds.transform == crop.transform and ds.nodata == src.nodata and ds.descriptions == src.descriptions
        assert np.array_equal(ds.read(), src.read(window=rasterio.windows.Window(10, 20, 30, 40)))
    shifted = Grid(grid.crs, crop.transform * crop.transform.translation(0.5, 0), 30, 40)
    with pytest.raises(ValueError, match="lattice"):
        crop_to_grid(scene.embeddings, tmp_path / "bad.tif", shifted)
    with pytest.raises(ValueError, match="not inside"):
        crop_to_grid(scene.embeddings, tmp_path / "bad.tif", grow_grid(grid, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.tif"]


def test_job_and_result_round_trip_through_json(scene, tmp_path):
    job = HeightJob(embeddings=str(scene.embeddings), out_dir=str(tmp_path), model="/models/m",
                    aoi=pixel_aoi(scene, 3, 4, 50), reference="/ref.tif", name="x", device="cuda", tile=128,
                    overlap=32, batch_size=2, source="cog", year=2021, source_options={"base_url": "http://h"},
                    cache_dir="/cache", terrain="/t.tif", context=96)
    again = HeightJob.from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job and again.aoi == job.aoi
    assert HeightJob.from_dict(json.loads(json.dumps(HeightJob("e.tif", "out").to_dict()))) == HeightJob("e.tif", "out")
    result = HeightJobResult(tmp_path / "h.tif", tmp_path / "e.tif", fetched=True, difference=tmp_path / "d.tif",
                             metrics_file=tmp_path / "m.json", metrics={"rmse": 1.5, "n": 10, "plots": ["a.png"]},
                             plots=["a.png"], device="cpu", model_name="demo", context=64)
    again = HeightJobResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result and isinstance(again.predicted, type(result.predicted)) and again.difference is not None
    bare = HeightJobResult(tmp_path / "h.tif", tmp_path / "e.tif")
    assert HeightJobResult.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_job_module_imports_without_torch_or_rasterio():
    code = ("import sys, alphaearth_height.plugin.core.job as job; "
            "job.HeightJob.from_dict(job.HeightJob('e', 'o').to_dict()); "
            "heavy = [m for m in ('torch', 'rasterio') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
