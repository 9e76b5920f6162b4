"""Prediction and fetch on a real Dask LocalCluster (2 worker processes on 127.0.0.1).

The chunked result must equal the single-process prediction within 0.01 m: that only
holds when each chunk runs exactly the whole raster's tiles around it, so the geometry
is tested on its own too. Resume, a worker killed mid-run and a chunk that keeps failing
are run for real on the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.distributed import (Layout, assemble, check_distributed_output, chunk_folder,
                                                       fetch_distributed, open_client, plan_chunks, predict_chunk,
                                                       predict_distributed)
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import predict_height, tile_layout

distributed = pytest.importorskip("distributed")

CHUNK = 100   # not a multiple of the tile spacing: chunk edges fall inside tiles


@pytest.fixture(scope="module")
def client():
    with open_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def single(small_scene, tiny_model, tmp_path_factory) -> np.ndarray:
    """The single-process prediction everything is compared with."""
    out = tmp_path_factory.mktemp("single") / "single.tif"
    predict_height(small_scene.embeddings, tiny_model, out, device="cpu")
    return _read(out)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.mark.parametrize("width,height,tile,overlap,multiple,chunk",
                         [(256, 256, 64, 16, 8, 100), (1000, 700, 256, 64, 32, 300), (97, 50, 64, 16, 8, 64),
                          (300, 301, 64, 1, 1, 64)])
def test_chunks_run_exactly_the_whole_rasters_tiles_around_their_interior(width, height, tile, overlap,
                                                                           multiple, chunk):
    """Every whole-raster tile touching a chunk is in its list, no other; interiors cover the raster once."""
    layout = Layout.of(width, height, tile, overlap, multiple)
    assert layout == Layout(*tile_layout(height, tile, overlap, multiple)[:1],
                            tuple(tile_layout(height, tile, overlap, multiple)[1]),
                            *tile_layout(width, tile, overlap, multiple)[:1],
                            tuple(tile_layout(width, tile, overlap, multiple)[1]))
    covered = np.zeros((height, width), dtype=int)
    for c in plan_chunks(width, height, chunk, layout):
        r0, c0, h, w = int(c.inner.row_off), int(c.inner.col_off), int(c.inner.height), int(c.inner.width)
        covered[r0:r0 + h, c0:c0 + w] += 1
        assert list(c.rows) == [r for r in layout.rows if r < r0 + h and r + layout.th > r0]
        assert list(c.cols) == [k for k in layout.cols if k < c0 + w and k + layout.tw > c0]
        # the context read holds every such tile, and the interior
        assert c.outer.row_off <= r0 and c.outer.row_off + c.outer.height >= r0 + h
        assert c.outer.row_off + c.outer.height == c.rows[-1] + layout.th
    assert (covered == 1).all()


def test_chunk_plan_names_and_refusals():
    layout = Layout.of(256, 256, 64, 16, 8)
    chunks = plan_chunks(256, 256, CHUNK, layout)
    assert [c.name for c in chunks[:4]] == ["chunk-r000-c000", "chunk-r000-c001", "chunk-r000-c002",
                                            "chunk-r001-c000"]
    middle = chunks[4]
    assert (middle.inner.col_off, middle.inner.width) == (100, 100)
    assert middle.outer.col_off <= 100 - layout.tw + 1 + 16  # context reaches back about a tile
    with pytest.raises(InputError, match="smaller than the prediction tile"):
        plan_chunks(256, 256, 32, layout)
    with pytest.raises(InputError, match="--cog does not apply"):
        check_distributed_output("x.vrt", cog=True)


def test_distributed_prediction_equals_single_process_and_resumes(client, small_scene, tiny_model, single, tmp_path):
    from osgeo import gdal

    out = tmp_path / "height.vrt"
    result = predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=CHUNK,
                                 device="cpu")
    assert (result.chunks, result.done, result.skipped) == (9, 9, 0)
    assert len(list(chunk_folder(out).glob("chunk-*.tif"))) == 9
    got = _read(out)
    assert got.shape == single.shape
    assert np.array_equal(got == -9999.0, single == -9999.0)
    assert np.nanmax(np.abs(got - single)) <= 0.01

    again = predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=CHUNK,
                                device="cpu")
    assert (again.done, again.skipped) == (0, 9)

    cog = assemble(sorted(chunk_folder(out).glob("chunk-*.tif")), tmp_path / "height.tif", cog=True, block=64)
    info = gdal.Info(str(cog), format="json")
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert [o["size"] for o in info["bands"][0]["overviews"]] == [[128, 128], [64, 64]]
    assert np.nanmax(np.abs(_read(cog) - single)) <= 0.01

    (chunk_folder(out) / "chunk-r001-c002.tif").unlink()
    third = predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=CHUNK,
                                device="cpu")
    assert (third.done, third.skipped) == (1, 8)
    assert np.nanmax(np.abs(_read(out) - single)) <= 0.01

    # chunks of this run are never taken for another's
    with pytest.raises(InputError, match="holds chunks of another run"):
        predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=128, device="cpu")


def _dies_once(marker: str, victim: str):
    """A chunk task whose worker process dies (os._exit) the first time it reaches ``victim``."""
    def task(**job):
        if job["name"] == victim and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)
        return predict_chunk(**job)
    return task


def test_a_worker_killed_mid_run_still_gives_the_whole_cog(client, small_scene, tiny_model, single, tmp_path):
    from osgeo import gdal

    marker = tmp_path / "died"
    out = tmp_path / "height.tif"
    result = predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=CHUNK,
                                 cog=True, device="cpu", task=_dies_once(str(marker), "chunk-r001-c001"))
    assert marker.exists()  # the worker did die
    assert result.done == 9
    assert np.nanmax(np.abs(_read(out) - single)) <= 0.01
    assert gdal.Info(str(out), format="json")["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert not chunk_folder(out).exists()  # one file asked for: the chunks are gone


def _always_fails(victim: str):
    def task(**job):
        if job["name"] == victim:
            raise RuntimeError("disk on fire")
        return predict_chunk(**job)
    return task


def test_a_chunk_that_keeps_failing_is_named_and_the_others_are_kept(client, small_scene, tiny_model, tmp_path):
    out = tmp_path / "height.vrt"
    with pytest.raises(InputError, match=r"chunk-r002-c000: failed after 2 tries \(RuntimeError: disk on fire\)"):
        predict_distributed(small_scene.embeddings, tiny_model, out, client=client, chunk_size=CHUNK,
                            device="cpu", retries=1, task=_always_fails("chunk-r002-c000"))
    assert len(list(chunk_folder(out).glob("chunk-*.tif"))) == 8
    assert not out.exists()


def test_distributed_fetch_of_a_local_raster_equals_the_single_fetch(client, small_scene, tmp_path):
    from alphaearth_height.plugin.core.aoi import AreaOfInterest
    from alphaearth_height.plugin.core.fetch import fetch

    with rasterio.open(small_scene.embeddings) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string()
    aoi = AreaOfInterest(left + 205, bottom + 305, right - 415, top - 95, crs=crs)
    single = fetch(aoi, 2020, "local", tmp_path / "single.tif", raster=str(small_scene.embeddings))
    result = fetch_distributed(aoi, 2020, "local", tmp_path / "chunked.vrt", client=client, chunk_size=CHUNK,
                               raster=str(small_scene.embeddings))
    assert result.chunks > 1
    with rasterio.open(single.path) as a, rasterio.open(result.path) as b:
        assert (a.width, a.height, a.transform, a.crs) == (b.width, b.height, b.transform, b.crs)
        assert np.array_equal(a.read(), b.read())
        assert b.nodata == a.nodata and b.dtypes == a.dtypes
        assert b.tags().get("ATTRIBUTION") == a.tags().get("ATTRIBUTION") is not None


def test_prediction_reads_a_fetched_vrt(client, small_scene, tiny_model, tmp_path):
    """The fetch's VRT (int8 chunk files) is an input like any raster: same heights as from one GeoTIFF."""
    from alphaearth_height.plugin.core.aoi import AreaOfInterest
    from alphaearth_height.plugin.core.fetch import fetch

    with rasterio.open(small_scene.embeddings) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string()
    aoi = AreaOfInterest(left + 100, bottom + 200, right - 300, top - 50, crs=crs)
    single = fetch(aoi, 2020, "local", tmp_path / "single.tif", raster=str(small_scene.embeddings))
    vrt = fetch_distributed(aoi, 2020, "local", tmp_path / "emb.vrt", client=client, chunk_size=CHUNK,
                            raster=str(small_scene.embeddings)).path
    predict_height(single.path, tiny_model, tmp_path / "single_height.tif", device="cpu")
    result = predict_distributed(vrt, tiny_model, tmp_path / "height.vrt", client=client, chunk_size=CHUNK,
                                 device="cpu")
    assert np.nanmax(np.abs(_read(result.path) - _read(tmp_path / "single_height.tif"))) <= 0.01


def test_cli_predict_with_workers_writes_the_same_heights(small_scene, tiny_model, single, tmp_path, capsys):
    """The command line starts its own 2-worker LocalCluster; a .tif --out is one GeoTIFF, chunks removed."""
    from alphaearth_height.cli import main

    out = tmp_path / "cli.tif"
    assert main(["predict", "--embeddings", str(small_scene.embeddings), "--model", str(tiny_model),
                 "--out", str(out), "--device", "cpu", "--workers", "2", "--chunk-size", "128"]) == 0
    assert "4 chunks: 4 run, 0 already done" in capsys.readouterr().out
    assert np.nanmax(np.abs(_read(out) - single)) <= 0.01
    assert not chunk_folder(out).exists()


def test_cli_refuses_cluster_options_without_a_cluster(small_scene, tiny_model, tmp_path, capsys):
    from alphaearth_height.cli import main

    assert main(["predict", "--embeddings", str(small_scene.embeddings), "--model", str(tiny_model),
                 "--out", str(tmp_path / "x.tif"), "--cog"]) != 0
    assert "--chunk-size/--cog: only apply to a run on a Dask cluster" in capsys.readouterr().err
    with pytest.raises(InputError, match="need exactly one of the two"):
        with open_client(workers=2, scheduler="tcp://127.0.0.1:1"):
            pass


def test_a_server_that_is_not_a_dask_scheduler_is_one_line():
    """A web server on the port (it answers in HTTP): one line naming the address, not a MemoryError."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(InputError) as caught:
            with open_client(scheduler=address):
                pass
    finally:
        server.close()
    message = str(caught.value)
    assert message.startswith(f"Dask scheduler {address}: ") and "\n" not in message


def test_without_dask_installed_the_cluster_options_say_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: importing it fails
    with pytest.raises(InputError, match=r"need Dask, which is not installed. Install the extra"):
        with open_client(workers=2):
            pass


def test_distributed_fetch_from_the_cog_mirror_across_utm_zones(client, tmp_path):
    """Chunks fetched by the workers over HTTP ranges (one shared cache) make the single fetch's raster."""
    from range_server import PREFIX, RangeServer, build_mirror, expected_output

    from alphaearth_height.plugin.core import aef
    from alphaearth_height.plugin.core.aoi import AreaOfInterest
    from alphaearth_height.plugin.core.fetch.tiling import output_grid

    cogs = build_mirror(tmp_path / "mirror")
    aoi = AreaOfInterest(-0.04, 45.0, 0.035, 45.02, "EPSG:4326")
    with RangeServer(tmp_path / "mirror") as srv:
        result = fetch_distributed(aoi, 2020, "cog", tmp_path / "e.tif", client=client, chunk_size=256,
                                   cache_dir=str(tmp_path / "cache"), base_url=f"{srv.url}/{PREFIX}",
                                   tile_size=256, retry_delay=0.05)
    grid = output_grid(aoi)
    assert result.chunks == 3 and result.done == 3
    with rasterio.open(result.path) as ds:
        assert (ds.transform, ds.crs, ds.dtypes[0]) == (grid.transform, grid.crs, "int8")
        assert ds.tags()["ATTRIBUTION"] == aef.ATTRIBUTION
        assert np.array_equal(ds.read(), expected_output(grid, [cogs["w"], cogs["e"]]))


def test_cli_fetch_with_workers_and_resume(small_scene, tmp_path, capsys):
    from alphaearth_height.cli import main
    from alphaearth_height.plugin.core.aoi import AreaOfInterest
    from alphaearth_height.plugin.core.fetch import fetch

    with rasterio.open(small_scene.embeddings) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string()
    box = [left + 200, bottom + 300, right - 400, top - 100]
    single = fetch(AreaOfInterest(*box, crs=crs), 2020, "local", tmp_path / "single.tif",
                   raster=str(small_scene.embeddings))
    argv = ["fetch", "--source", "local", "--local-raster", str(small_scene.embeddings), "--year", "2020",
            "--aoi", *map(str, box), "--aoi-crs", crs, "--out", str(tmp_path / "e.vrt"), "--workers", "2",
            "--chunk-size", "128"]
    assert main(argv) == 0
    assert "4 chunks: 4 run, 0 already done" in capsys.readouterr().out
    assert main(argv) == 0
    assert "4 chunks: 0 run, 4 already done" in capsys.readouterr().out
    with rasterio.open(single.path) as a, rasterio.open(tmp_path / "e.vrt") as b:
        assert np.array_equal(a.read(), b.read())
