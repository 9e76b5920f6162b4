"""The uncertainty raster (TTA spread) on a real Dask LocalCluster (2 worker processes on 127.0.0.1).

Each chunk runs the model wrapped as ``predict_uncertainty`` wraps it through the whole
raster's tiles, so the assembled spread must equal the one-process file within 0.01 m,
nodata included, with the same description and tags (the calibrated 90 % interval's
scale among them). Its chunks are a run of their own: never resumed as heights, and
finished ones are skipped on a re-run. A terrain model's spread needs no terrain, as
on one process. The command line writes heights and spread on the cluster.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.distributed import MANIFEST, chunk_folder, open_client, predict_distributed
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.uncertainty import predict_uncertainty

from conftest import assert_same_raster

pytest.importorskip("distributed")

CHUNK = 100   # not a multiple of the tile spacing: chunk edges fall inside tiles
K = 1.7       # a calibrated scale in the card: its tags must reach the assembled file
STATISTICS = ("STATISTICS_", "VALID_PIXELS")  # whole-file statistics: one process writes them, an assembly cannot


@pytest.fixture(scope="module")
def client():
    with open_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def calibrated_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an ``uncertainty`` calibration in its card, as ``calibrate`` adds it."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("models") / "calibrated"))
    card = json.loads((folder / "model.json").read_text())
    card["uncertainty"] = {"k": K, "coverage": 0.9}
    (folder / "model.json").write_text(json.dumps(card, indent=1))
    return folder


@pytest.fixture(scope="module")
def single(small_scene, calibrated_model, tmp_path_factory) -> Path:
    """The one-process uncertainty raster everything is compared with."""
    out = tmp_path_factory.mktemp("single") / "spread.tif"
    predict_uncertainty(small_scene.embeddings, calibrated_model, out, device="cpu")
    return out


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _described(path: Path) -> tuple[str, dict, dict]:
    """Band description, band tags (statistics left out) and dataset tags."""
    with rasterio.open(path) as src:
        band = {k: v for k, v in src.tags(1).items() if not k.startswith(STATISTICS)}
        return src.descriptions[0], band, src.tags()


def test_spread_on_dask_equals_one_process_with_its_tags_and_resumes(client, small_scene, calibrated_model,
                                                                     single, tmp_path):
    out = tmp_path / "spread.vrt"
    result = predict_distributed(small_scene.embeddings, calibrated_model, out, client=client, chunk_size=CHUNK,
                                 device="cpu", uncertainty=True)
    assert (result.chunks, result.done, result.skipped) == (9, 9, 0)
    assert_same_raster(out, single)
    assert _described(out) == _described(single)
    assert float(_described(out)[1]["INTERVAL_90_SCALE"]) == pytest.approx(K)
    assert json.loads((chunk_folder(out) / MANIFEST).read_text())["uncertainty"] is True

    (chunk_folder(out) / "chunk-r001-c001.tif").unlink()
    again = predict_distributed(small_scene.embeddings, calibrated_model, out, client=client, chunk_size=CHUNK,
                                device="cpu", uncertainty=True)
    assert (again.done, again.skipped) == (1, 8)
    assert_same_raster(out, single)

    with pytest.raises(InputError, match="holds chunks of another run"):  # heights never reuse spread chunks
        predict_distributed(small_scene.embeddings, calibrated_model, out, client=client, chunk_size=CHUNK,
                            device="cpu")


def test_a_terrain_models_spread_needs_no_terrain_as_on_one_process(client, small_scene, terrain_model,
                                                                     scene_terrain, tmp_path):
    """The spread of the relief is the spread of the height: no terrain, even when one is given."""
    predict_uncertainty(small_scene.embeddings, terrain_model, tmp_path / "one.tif", device="cpu")
    predict_distributed(small_scene.embeddings, terrain_model, tmp_path / "dask.tif", client=client,
                        chunk_size=CHUNK, device="cpu", uncertainty=True, terrain=scene_terrain)
    assert_same_raster(tmp_path / "dask.tif", tmp_path / "one.tif")
    assert not chunk_folder(tmp_path / "dask.tif").exists()  # one GeoTIFF asked for: chunks removed


def test_cli_predict_uncertainty_on_workers_equals_one_process(small_scene, calibrated_model, tmp_path, capsys):
    from alphaearth_height.cli import main

    base = ["predict", "--embeddings", str(small_scene.embeddings), "--model", str(calibrated_model),
            "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "h1.tif"), "--uncertainty", str(tmp_path / "u1.tif")]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "h.tif"), "--uncertainty", str(tmp_path / "u.vrt"),
                 "--workers", "2", "--chunk-size", "128"]) == 0
    printed = capsys.readouterr().out
    assert "4 chunks: 4 run, 0 already done" in printed
    assert "test-time augmentation spread, 256x256 px, 4 chunks" in printed
    assert f"prediction ± {K:.2f} x spread" in printed
    assert_same_raster(tmp_path / "h.tif", tmp_path / "h1.tif")
    assert_same_raster(tmp_path / "u.vrt", tmp_path / "u1.tif")
    assert _described(tmp_path / "u.vrt") == _described(tmp_path / "u1.tif")
    assert np.abs(_read(tmp_path / "h.tif") - _read(tmp_path / "u.vrt")).max() > 10  # a spread, not heights


def test_cli_checks_the_uncertainty_output_before_any_chunk(small_scene, tiny_model, tmp_path, capsys):
    from alphaearth_height.cli import main

    assert main(["predict", "--embeddings", str(small_scene.embeddings), "--model", str(tiny_model),
                 "--device", "cpu", "--out", str(tmp_path / "h.tif"), "--uncertainty", str(tmp_path / "u.vrt"),
                 "--workers", "2", "--cog"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a VRT, which --cog does not apply to" in err[0]
    assert not (tmp_path / "h.tif").exists() and not chunk_folder(tmp_path / "h.tif").exists()
