"""run_height_job: embeddings through core.fetch, then prediction; nothing left behind on failure."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.aoi import AreaOfInterest, aoi_window
from alphaearth_height.plugin.core.resample import ReferenceOnGrid
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.cancel import Cancelled
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.job import FETCH_END, HeightJob, remove_outputs, run_height_job
from alphaearth_height.plugin.core.rasters import EmbeddingRaster
from conftest import UTM


def scene_job(scene, model, out_dir, **changes) -> HeightJob:
    left, bottom, right, top = scene.grid.bounds
    aoi = AreaOfInterest(left + 505, bottom + 700, right - 333, top - 410, UTM)
    job = HeightJob(embeddings=str(scene.embeddings), out_dir=str(out_dir), model=str(model), aoi=aoi,
                    name="scene", device="cpu", batch_size=2)
    for key, value in changes.items():
        setattr(job, key, value)
    return job


def test_local_source_with_aoi_fetches_the_window(small_scene, tiny_model, tmp_path):
    job = scene_job(small_scene, tiny_model, tmp_path)
    progress: list[float] = []
    result = run_height_job(job, progress=progress.append)
    assert result.fetched and result.embeddings == tmp_path / "scene_embeddings.tif"
    with EmbeddingRaster(small_scene.embeddings) as src:
        window = aoi_window(src.grid, job.aoi)
        direct = aef.quantise(src.read(window))
        transform = src.grid.window_transform(window)
    with rasterio.open(result.embeddings) as ds:
        assert np.array_equal(ds.read(), direct)
        assert ds.transform == transform and ds.count == 64 and ds.tags()["ATTRIBUTION"] == aef.ATTRIBUTION
    with rasterio.open(result.predicted) as ds:
        assert (ds.width, ds.height) == (direct.shape[2], direct.shape[1]) and ds.transform == transform
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene_embeddings.tif", "scene_height.tif"]
    assert progress == sorted(progress) and FETCH_END in progress and progress[-1] == 100.0


@pytest.mark.parametrize("when", ["fetching", "predicting"])
def test_cancelled_job_leaves_the_folder_empty(small_scene, tiny_model, tmp_path, when):
    progress: list[float] = []
    cancel = (lambda: True) if when == "fetching" else (lambda: bool(progress) and progress[-1] > FETCH_END)
    with pytest.raises(Cancelled):
        run_height_job(scene_job(small_scene, tiny_model, tmp_path, reference=str(small_scene.reference)),
                       progress=progress.append, cancel=cancel)
    assert when == "fetching" or max(progress) > FETCH_END  # cancelled after the fetch wrote its file
    assert list(tmp_path.iterdir()) == []


def test_whole_local_raster_is_used_as_is_and_never_removed(small_scene, tiny_model, tmp_path):
    own = tmp_path / "mine_embeddings.tif"  # the name a fetched file would have
    shutil.copy(small_scene.embeddings, own)
    result = run_height_job(scene_job(small_scene, tiny_model, tmp_path, embeddings=str(own), aoi=None))
    assert result.embeddings == own and not result.fetched
    remove_outputs(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine_embeddings.tif"]


def test_remote_sources_need_an_aoi(small_scene, tiny_model, tmp_path):
    for source in ("cog", "earthengine"):
        with pytest.raises(InputError, match="needs an area of interest"):
            run_height_job(scene_job(small_scene, tiny_model, tmp_path, embeddings="", aoi=None, source=source))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_an_earlier_runs_outputs(small_scene, tiny_model, tmp_path):
    earlier = tmp_path / "height_height.tif"
    earlier.write_bytes(b"an earlier result")
    os.utime(earlier, (1_000_000_000, 1_000_000_000))
    job = HeightJob(embeddings=str(small_scene.embeddings), out_dir=str(tmp_path), model=str(tiny_model),
                    device="cpu", tile=60)  # 60 is not a multiple of 8: refused before writing
    with pytest.raises(InputError):
        run_height_job(job)
    assert earlier.read_bytes() == b"an earlier result"


def test_a_terrain_model_job_adds_the_terrain_to_the_relief(small_scene, terrain_model, scene_terrain, tmp_path):
    job = scene_job(small_scene, terrain_model, tmp_path, aoi=None)
    with pytest.raises(InputError, match="coarse terrain raster"):
        run_height_job(job)
    assert list(tmp_path.iterdir()) == []
    job.terrain = str(scene_terrain)
    result = run_height_job(job)
    relief = predict_height(small_scene.embeddings, terrain_model, tmp_path / "relief.tif", device="cpu",
                            batch_size=2, relative=True)
    grid = small_scene.grid
    with rasterio.open(result.predicted) as h, rasterio.open(relief.path) as r:
        height, relief_m = h.read(1, masked=True), r.read(1, masked=True)
    with ReferenceOnGrid(scene_terrain, grid) as terrain:
        ground = terrain.read(Window(0, 0, grid.width, grid.height))
    both = ~height.mask & np.isfinite(ground)
    assert both.sum() > 1000
    assert np.allclose(height[both], relief_m[both] + ground[both], atol=1e-3)


def test_a_job_on_two_local_dask_workers_equals_the_single_process_job(small_scene, tiny_model, tmp_path):
    """Chunks on a real LocalCluster (127.0.0.1), assembled into the job's one GeoTIFF; then compared as usual."""
    for name in ("one", "dask"):
        (tmp_path / name).mkdir()
    single = run_height_job(scene_job(small_scene, tiny_model, tmp_path / "one", reference=str(small_scene.reference)))
    job = scene_job(small_scene, tiny_model, tmp_path / "dask", reference=str(small_scene.reference),
                    dask_workers=2, dask_chunk_size=128)
    assert HeightJob.from_dict(job.to_dict()) == job
    progress: list[float] = []
    result = run_height_job(job, progress=progress.append)
    with rasterio.open(single.predicted) as a, rasterio.open(result.predicted) as b:
        assert (a.transform, a.shape, a.crs) == (b.transform, b.shape, b.crs)
        one, many = a.read(1, masked=True), b.read(1, masked=True)
    assert np.array_equal(one.mask, many.mask) and (~one.mask).sum() > 1000
    assert np.abs(one - many).max() <= 0.01
    assert result.device.startswith("2 local Dask workers (") and "chunks" in result.device
    assert result.metrics["overall"]["rmse"] == pytest.approx(single.metrics["overall"]["rmse"], abs=0.01)
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert progress == sorted(progress) and progress[-1] == 100.0


def test_a_terrain_model_job_on_dask_equals_the_single_process_job(small_scene, terrain_model, scene_terrain,
                                                                    tmp_path):
    """The job's terrain reaches the chunks: relief + terrain, as on one process."""
    heights = []
    for name, dask in (("one", {}), ("dask", {"dask_workers": 2, "dask_chunk_size": 128})):
        (tmp_path / name).mkdir()
        job = scene_job(small_scene, terrain_model, tmp_path / name, aoi=None, terrain=str(scene_terrain), **dask)
        with rasterio.open(run_height_job(job).predicted) as src:
            heights.append(src.read(1, masked=True))
    one, many = heights
    assert np.array_equal(one.mask, many.mask) and (~one.mask).sum() > 1000
    assert np.abs(one - many).max() <= 0.01


def test_a_dask_job_with_a_bad_scheduler_fails_in_one_line_before_fetching(small_scene, tiny_model, tmp_path):
    for address, expected in (("tcp://no-port", "is not an address like tcp://HOST:PORT"),
                              ("foo://host:8786", "is not an address like tcp://HOST:PORT")):
        with pytest.raises(InputError, match=expected) as caught:
            run_height_job(scene_job(small_scene, tiny_model, tmp_path, dask_scheduler=address))
        assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
