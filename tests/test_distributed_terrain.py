"""Models trained on height above a coarse terrain, run on a real Dask LocalCluster (2 workers).

Each chunk predicts the relief as one process does and adds the terrain read from the
whole raster's warp over its interior, so the assembled heights must equal
``predict_surface`` on one process within 0.01 m, nodata included. The terrain file is
part of the run's identity: a folder of chunks made with one terrain is not resumed
with another. The command line and the plugin's worker pass the terrain through.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.distributed import chunk_folder, open_client, predict_distributed
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.terrain import predict_surface

from conftest import assert_same_raster

pytest.importorskip("distributed")

CHUNK = 100   # not a multiple of the tile spacing nor of GDAL's blocks: chunk edges fall inside both


@pytest.fixture(scope="module")
def client():
    with open_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def single(small_scene, terrain_model, scene_terrain, tmp_path_factory) -> Path:
    """The single-process prediction (relief + terrain) everything is compared with."""
    out = tmp_path_factory.mktemp("single") / "single.tif"
    predict_surface(small_scene.embeddings, terrain_model, out, scene_terrain, device="cpu")
    return out


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_terrain_model_on_dask_equals_one_process_and_resumes_only_with_its_terrain(
        client, small_scene, terrain_model, scene_terrain, single, tmp_path):
    out = tmp_path / "height.vrt"
    result = predict_distributed(small_scene.embeddings, terrain_model, out, client=client, chunk_size=CHUNK,
                                 device="cpu", terrain=scene_terrain)
    assert (result.chunks, result.done, result.skipped) == (9, 9, 0)
    assert_same_raster(out, single)
    # the relief alone is metres away from it: the terrain was added
    relief = tmp_path / "relief.tif"
    predict_height(small_scene.embeddings, terrain_model, relief, relative=True, device="cpu")
    assert np.abs(_read(relief) - _read(single)).max() > 10
    with rasterio.open(out) as got, rasterio.open(single) as want:
        assert got.tags()["TERRAIN"] == want.tags()["TERRAIN"] == scene_terrain.name

    again = predict_distributed(small_scene.embeddings, terrain_model, out, client=client, chunk_size=CHUNK,
                                device="cpu", terrain=scene_terrain)
    assert (again.done, again.skipped) == (0, 9)

    other = shutil.copy(scene_terrain, tmp_path / "other_terrain.tif")  # same values, another file
    with pytest.raises(InputError, match="holds chunks of another run"):
        predict_distributed(small_scene.embeddings, terrain_model, out, client=client, chunk_size=CHUNK,
                            device="cpu", terrain=other)


def _in_degrees(terrain: Path, out: Path) -> Path:
    """The terrain reprojected to EPSG:4326: a warp whose result depends on the windows GDAL warps."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(terrain) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                               *src.bounds, resolution=0.0013)
        values = np.full((height, width), np.nan, dtype=np.float32)
        reproject(rasterio.band(src, 1), values, dst_transform=transform, dst_crs="EPSG:4326",
                  resampling=Resampling.bilinear, dst_nodata=np.nan)
    with rasterio.open(out, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       crs="EPSG:4326", transform=transform, nodata=np.nan) as dst:
        dst.write(values, 1)
    return out


def test_a_terrain_in_another_crs_gives_the_same_heights_as_one_process(client, small_scene, terrain_model,
                                                                        scene_terrain, tmp_path):
    """Warped onto each chunk's own grid it would differ by decimetres; read from the whole grid's warp it does not."""
    terrain = _in_degrees(scene_terrain, tmp_path / "terrain_4326.tif")
    predict_surface(small_scene.embeddings, terrain_model, tmp_path / "one.tif", terrain, device="cpu")
    predict_distributed(small_scene.embeddings, terrain_model, tmp_path / "dask.vrt", client=client,
                        chunk_size=CHUNK, device="cpu", terrain=terrain)
    assert_same_raster(tmp_path / "dask.vrt", tmp_path / "one.tif")


def test_relief_model_without_terrain_is_refused_as_on_one_process(client, small_scene, terrain_model,
                                                                   tiny_model, scene_terrain, tmp_path):
    with pytest.raises(InputError) as on_one:
        predict_surface(small_scene.embeddings, terrain_model, tmp_path / "one.tif", device="cpu")
    with pytest.raises(InputError) as on_dask:
        predict_distributed(small_scene.embeddings, terrain_model, tmp_path / "dask.vrt", client=client,
                            device="cpu")
    with pytest.raises(InputError) as direct:
        predict_height(small_scene.embeddings, terrain_model, tmp_path / "direct.tif", device="cpu")
    assert str(on_dask.value) == str(on_one.value) == str(direct.value)
    assert "which this prediction was not given" in str(on_dask.value)
    with pytest.raises(InputError, match="was trained without a terrain input"):
        predict_distributed(small_scene.embeddings, tiny_model, tmp_path / "dask.vrt", client=client,
                            device="cpu", terrain=scene_terrain)
    assert not chunk_folder(tmp_path / "dask.vrt").exists()


def test_a_terrain_beside_the_area_is_one_line_before_any_chunk(client, small_scene, terrain_model,
                                                                scene_terrain, tmp_path):
    far = tmp_path / "far.tif"
    with rasterio.open(scene_terrain) as src:
        profile, values = src.profile, src.read()
    profile["transform"] = profile["transform"] * profile["transform"].translation(1000, 0)
    with rasterio.open(far, "w", **profile) as dst:
        dst.write(values)
    with pytest.raises(InputError, match="does not overlap the target area"):
        predict_distributed(small_scene.embeddings, terrain_model, tmp_path / "h.vrt", client=client,
                            device="cpu", terrain=far)
    assert not chunk_folder(tmp_path / "h.vrt").exists()


def test_cli_predict_with_terrain_and_workers(small_scene, terrain_model, scene_terrain, single, tmp_path, capsys):
    from alphaearth_height.cli import main

    out = tmp_path / "cli.tif"
    base = ["predict", "--embeddings", str(small_scene.embeddings), "--model", str(terrain_model),
            "--device", "cpu", "--terrain", str(scene_terrain)]
    assert main([*base, "--out", str(out), "--workers", "2", "--chunk-size", "128"]) == 0
    assert "4 chunks: 4 run, 0 already done" in capsys.readouterr().out
    assert_same_raster(out, single)
    assert not chunk_folder(out).exists()

    # the spread of a terrain model on the cluster: its relief's spread, next to the heights
    assert main([*base, "--out", str(tmp_path / "u.tif"), "--uncertainty", str(tmp_path / "s.tif"),
                 "--workers", "2"]) == 0
    assert (tmp_path / "u.tif").exists() and (tmp_path / "s.tif").exists()


def test_the_plugins_worker_passes_the_terrain_to_dask(small_scene, terrain_model, scene_terrain, single,
                                                       tmp_path):
    """Processing's request, as predict_height.py builds it, run by a real worker process on 2 Dask workers."""
    from alphaearth_height.plugin.core.worker import call_worker

    out = tmp_path / "worker.tif"
    result = call_worker("predict", {"embeddings": str(small_scene.embeddings), "model": str(terrain_model),
                                     "out": str(out), "terrain": str(scene_terrain), "tile": None,
                                     "overlap": None, "batch_size": 4, "device": "cpu", "backend": "auto",
                                     "amp": True, "max_mpx": None, "workers": 2, "scheduler": None,
                                     "too_large_fix": "clip"}, python=sys.executable)
    assert result["device"].startswith("Dask")
    assert_same_raster(out, single)
