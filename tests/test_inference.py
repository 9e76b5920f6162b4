import threading

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.windows import Window

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.cancel import Cancelled
from alphaearth_height.plugin.core.inference import TilePlan, blend_weights, predict_height, tile_layout
from alphaearth_height.plugin.core.models import open_package
from alphaearth_height.plugin.core.rasters import OUTPUT_NODATA, EmbeddingRaster, Grid

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


def test_tile_layout_covers_keeps_the_overlap_and_wastes_little():
    assert tile_layout(200, 64, 16, 8) == (64, [0, 45, 90, 136])
    assert tile_layout(50, 64, 16, 8) == (56, [0])  # shrunk to the raster, rounded up to the multiple
    # 1024 px with 512 px tiles: three tiles of 384 px, not three of 512 (the last flush at 512)
    assert tile_layout(1024, 512, 64, 32) == (384, [0, 320, 640])
    for length in range(100, 3000, 37):
        size, starts = tile_layout(length, 512, 64, 32)
        assert size <= 512 and size % 32 == 0 and starts[0] == 0 and starts[-1] + size >= length
        if len(starts) > 1:
            assert starts[-1] + size == length and len(starts) * size <= 1.3 * length
            assert all(b - a <= size - 64 for a, b in zip(starts, starts[1:]))  # overlap of at least 64 px


def test_bundled_default_tiling_computes_at_most_1_35_input_px_per_output_px():
    """For any area from one tile up to a country (column bands included: no tile runs twice)."""
    from alphaearth_height.plugin.core.inference import DEFAULT_BAND_WIDTH
    from alphaearth_height.plugin.core.models import bundled_model_dir

    package = open_package(bundled_model_dir())
    tile, overlap = package.default("tile", 0), package.default("overlap", 0)
    sides = list(range(tile + 1, 12000, 97)) + [20011, 75000]
    for width, height in [(side, side) for side in sides] + [(side, 2 * tile + 3) for side in sides]:
        grid = Grid(CRS.from_epsg(32630), rasterio.Affine(10, 0, 0, 0, -10, 0), width, height)
        plan = TilePlan(grid, tile, overlap, package.multiple, DEFAULT_BAND_WIDTH)
        assert plan.input_per_output <= 1.35, (width, height, plan.input_per_output)


def test_batches_hold_the_pixels_of_batch_size_256_px_tiles_at_most():
    grid = Grid(CRS.from_epsg(32630), rasterio.Affine(10, 0, 0, 0, -10, 0), 4096, 4096)
    assert TilePlan(grid, 512, 64, 32, 4096).tiles_per_batch(4) == 1
    assert TilePlan(grid, 512, 64, 32, 4096).tiles_per_batch(8) == 2
    assert TilePlan(grid, 256, 64, 32, 4096).tiles_per_batch(4) == 4
    assert TilePlan(grid, 64, 16, 8, 4096).tiles_per_batch(3) == 3  # never more than asked
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
    assert result.tiles == len(tile_layout(200, 64, 16, 8)[1]) * len(tile_layout(232, 64, 16, 8)[1])


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
    size, starts = tile_layout(224, 96, 32, 8)
    hard_size, hard_starts = tile_layout(224, 96, 0, 8)
    assert _seam_ratio(tiled, starts, size) < 1.5
    assert _seam_ratio(hard, hard_starts, hard_size) > _seam_ratio(tiled, starts, size)
    spread = whole.std()
    assert np.abs(tiled - whole).mean() < np.abs(hard - whole).mean()
    # Where one tile sees all the context the network uses, tiling changes nothing.
    predict_height(path, tiny_model, tmp_path / "wide.tif", tile=160, overlap=64, device="cpu")
    wide = _read(tmp_path / "wide.tif")[0]
    np.testing.assert_allclose(wide[:, :24], whole[:, :24], atol=1e-3 * spread)
    np.testing.assert_allclose(wide[:, -24:], whole[:, -24:], atol=1e-3 * spread)


def test_column_bands_give_the_same_result_and_run_each_tile_once(scene, tiny_model, tmp_path, monkeypatch):
    """Bands hand the columns they share over as partial sums: the same heights as one band,
    and the model sees each tile once (before, the tiles across a band edge ran twice)."""
    from alphaearth_height.plugin.core import inference

    path, _ = scene
    seen = []
    make_runner = inference.make_runner

    def counting_runner(*args, **kwargs):
        runner = make_runner(*args, **kwargs)

        def run(batch):
            seen.extend(tile.tobytes() for tile in batch)
            return runner(batch)
        run.description = runner.description
        return run

    predict_height(path, tiny_model, tmp_path / "one.tif", device="cpu")
    monkeypatch.setattr(inference, "make_runner", counting_runner)
    result = predict_height(path, tiny_model, tmp_path / "bands.tif", device="cpu", band_width=100, batch_size=3)
    np.testing.assert_allclose(_read(tmp_path / "bands.tif")[0], _read(tmp_path / "one.tif")[0], atol=1e-4)
    band_tags = _read(tmp_path / "bands.tif")[2]  # dataset tags: TILE, OVERLAP
    with EmbeddingRaster(path) as src:
        plan = TilePlan(src.grid, int(band_tags["TILE"]), int(band_tags["OVERLAP"]), open_package(tiny_model).multiple,
                        100)
    assert len(plan.bands()) > 1 and result.tiles == len(plan.rows) * len(plan.cols)
    assert len(seen) == len(set(seen)) == result.tiles


def test_the_block_cache_keeps_a_tile_and_a_half_of_blocks(tmp_path):
    """Blocks one 544 px tile touches on 256 px blocks: 4 x 4 of 64 bands x 64 KiB, but no
    more than the raster has (a 320 px tile on 300 px); the cache holds half as many again,
    64 MiB at least."""
    from affine import Affine

    from alphaearth_height.plugin.core import aef
    from alphaearth_height.plugin.core.inference import read_cache_bytes

    sizes = {}
    for side in (1024, 300):
        path = tmp_path / f"e{side}.tif"
        with rasterio.open(path, "w", **aef.int8_profile(side, side, "EPSG:32630",
                                                          Affine(10, 0, 5e5, 0, -10, 5e6))) as dst:
            dst.write(np.zeros((aef.N_BANDS, side, side), dtype=np.int8))
        with EmbeddingRaster(path) as src:
            plan = TilePlan(src.grid, 608, 64, 32, 4096)
            sizes[side] = plan.th, src.window_block_bytes(plan.th, plan.tw), read_cache_bytes(src, plan)
    assert sizes[1024] == (544, 16 * aef.N_BANDS * 2**16, 96 * 2**20)
    assert sizes[300] == (320, 4 * aef.N_BANDS * 2**16, 64 * 2**20)


@pytest.mark.parametrize("bottom_up", [False, True])
def test_reading_a_tile_on_several_threads_gives_what_one_reads(tmp_path, bottom_up):
    """Each thread reads its share of the bands on its own handle: the same values and mask
    as one whole read, with nodata pixels (all bands) and one band alone at -128, uneven
    shares (64 bands on 3 threads), windows inside and one reaching past the edge."""
    from alphaearth_height.plugin.core import aef
    from alphaearth_height.plugin.core.inference import TileReader

    values = np.random.default_rng(5).uniform(-1, 1, (aef.N_BANDS, 90, 110)).astype(np.float32)
    values[:, 10:20, 30:50] = np.nan            # nodata: all bands
    values[40, 50:60, 5:15] = -1.0              # one band at its least valid code (-127)
    path = write_embeddings(tmp_path / "e.tif", values, bottom_up=bottom_up)
    with rasterio.open(path, "r+") as dst:      # one band alone at -128 makes the pixel invalid
        data = dst.read(42)
        data[90 - 1 - 84 if bottom_up else 84, 100] = aef.NODATA_INT8
        dst.write(data, 42)
    first, inside, past_edge = Window(0, 0, 64, 64), Window(40, 21, 64, 64), Window(60, 50, 64, 64)
    masks = {}
    with EmbeddingRaster(path) as src, TileReader(src, threads=3) as reader:
        assert src.reads_directly(inside) and not src.reads_directly(past_edge)
        for window in (first, inside, past_edge):
            alone, shared = (np.full((aef.N_BANDS, 64, 64), 9.0, dtype=np.float32) for _ in range(2))
            masks[window] = src.read_model_input(window, alone)
            np.testing.assert_array_equal(reader.read_model_input(window, shared), masks[window])
            np.testing.assert_array_equal(shared, alone)
    assert not masks[first][10:20, 30:50].any() and masks[first][:10].all() and masks[first][50:60, 5:15].all()
    assert not masks[inside][84 - 21, 100 - 40] and masks[inside].sum() == 64 * 64 - 1
    assert not masks[past_edge][40:].any()      # rows past the raster's 90


@pytest.mark.parametrize("on_cpu", [True, False])
def test_cancel_leaves_no_output(scene, tiny_model, tmp_path, monkeypatch, on_cpu):
    """Also as with a model on a GPU (reading ahead on a thread), which this machine has not."""
    from alphaearth_height.plugin.core import inference

    monkeypatch.setattr(inference, "_runs_on_cpu", lambda *args: on_cpu)
    path, _ = scene
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu", batch_size=1, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    # the reader threads (sharing tiles, or reading ahead) and the writer thread stopped with the prediction
    assert not [t for t in threading.enumerate() if t.name.startswith(("predict-reader", "predict-writer"))]


def test_reading_ahead_gives_the_same_heights(scene, tiny_model, tmp_path, monkeypatch):
    """The GPU's way (the next batch read on a thread during the forward pass, two buffers in
    turn) and the CPU's (each batch read on every core between passes) write the same file."""
    from alphaearth_height.plugin.core import inference

    path, _ = scene
    predict_height(path, tiny_model, tmp_path / "between.tif", device="cpu", batch_size=1)
    monkeypatch.setattr(inference, "_runs_on_cpu", lambda *args: False)
    predict_height(path, tiny_model, tmp_path / "ahead.tif", device="cpu", batch_size=1)
    np.testing.assert_array_equal(_read(tmp_path / "ahead.tif")[0], _read(tmp_path / "between.tif")[0])


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
    # the reader starts on the first batch while the model loads: a refused device stops it
    assert not [t for t in threading.enumerate() if t.name.startswith("predict-reader")]


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


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_infinite_embeddings_are_nodata_and_spread_nothing(tiny_model, tmp_path, backend):
    """+-Inf in float embeddings is nodata like NaN: those pixels are marked so, and no other pixel
    gets a NaN (as +-3.4e38 fed to the network, it once spread NaN through the convolutions)."""
    values = unit_embeddings(96, 128, seed=9)
    holes = np.zeros((96, 128), dtype=bool)
    holes[10:14, 20:26] = holes[60, 100] = holes[80:90, 5] = True
    infinite, nan = values.copy(), values.copy()
    infinite[3][holes], infinite[40][holes] = np.inf, -np.inf
    nan[3][holes] = nan[40][holes] = np.nan
    options = dict(tile=64, overlap=16, device="cpu", backend=backend)
    predict_height(write_embeddings(tmp_path / "inf.tif", infinite, quantised=False), tiny_model,
                   tmp_path / "inf_h.tif", **options)
    predict_height(write_embeddings(tmp_path / "nan.tif", nan, quantised=False), tiny_model,
                   tmp_path / "nan_h.tif", **options)
    heights, profile, _, band_tags, _ = _read(tmp_path / "inf_h.tif")
    assert (heights[holes] == profile["nodata"]).all()
    valid = heights[~holes]
    assert np.isfinite(valid).all() and (valid != profile["nodata"]).all()
    assert int(band_tags["VALID_PIXELS"]) == (~holes).sum()
    np.testing.assert_array_equal(heights, _read(tmp_path / "nan_h.tif")[0])  # exactly as if NaN


def test_float_embeddings_far_outside_the_unit_range_are_refused(tiny_model, tmp_path):
    values = unit_embeddings(64, 64, seed=2)
    values[7, 30, 30] = 1.2  # rounding or resampling slack: accepted
    path = write_embeddings(tmp_path / "slack.tif", values, quantised=False)
    predict_height(path, tiny_model, tmp_path / "ok.tif", device="cpu")
    values[7, 30, 30] = 40.0  # scaled embeddings, or not embeddings at all
    path = write_embeddings(tmp_path / "scaled.tif", values, quantised=False)
    with pytest.raises(InputError, match=r"scaled.tif: has embedding values up to 40 .* lie in \[-1, 1\]"):
        predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu")
    assert not (tmp_path / "h.tif").exists()


def test_tiles_without_a_valid_pixel_never_reach_the_model(tiny_model, tmp_path, monkeypatch):
    from alphaearth_height.plugin.core import inference

    values = unit_embeddings(64, 256, seed=4)
    values[:, :, :150] = np.nan  # the first two of four 64 px tiles (no overlap) have no data
    path = write_embeddings(tmp_path / "half.tif", values)
    seen = []
    real_call = inference.OnnxRunner.__call__

    def counting_call(self, batch):
        seen.append(len(batch))
        return real_call(self, batch)

    monkeypatch.setattr(inference.OnnxRunner, "__call__", counting_call)
    predict_height(path, tiny_model, tmp_path / "h.tif", tile=64, overlap=0, batch_size=4, backend="onnx")
    assert seen == [2]
    heights = _read(tmp_path / "h.tif")[0]
    assert (heights[:, :150] == OUTPUT_NODATA).all() and (heights[:, 150:] != OUTPUT_NODATA).all()


def test_embeddings_without_a_valid_pixel_are_refused(tiny_model, tmp_path):
    path = write_embeddings(tmp_path / "empty.tif", np.full((64, 80, 72), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="empty.tif: has no valid pixel in its 72 x 80 px"):
        predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu")
    assert not (tmp_path / "h.tif").exists()


def test_size_limit(scene, tiny_model, tmp_path):
    path, _ = scene  # 232 x 200 px = 0.0464 Mpx
    with pytest.raises(InputError, match=r"is 232 x 200 px \(0.046 Mpx.*above the limit of 0.04 Mpx.*Use --yes"):
        predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu", max_mpx=0.04, too_large_fix="Use --yes")
    assert list(tmp_path.iterdir()) == []
    predict_height(path, tiny_model, tmp_path / "h.tif", device="cpu", max_mpx=0.05)
    predict_height(path, tiny_model, tmp_path / "h2.tif", device="cpu", max_mpx=None)


@pytest.mark.parametrize("amp", [True, False])
def test_training_and_inference_share_one_precision_policy(tiny_model, amp):
    """Mixed precision and channels-last only on CUDA, for the trainer and the torch runner alike."""
    import torch

    from alphaearth_height.plugin.core.device import precision_policy
    from alphaearth_height.plugin.core.inference import TorchRunner
    from alphaearth_height.plugin.core.models import load_model

    assert precision_policy(torch.device("cpu"), amp) == (None, False)
    runner = TorchRunner(load_model(tiny_model), "cpu", amp, None)
    assert (runner.amp, runner.channels_last) == (False, False)
    if torch.cuda.is_available():
        dtype, channels_last = precision_policy(torch.device("cuda"), amp)
        assert channels_last and (dtype in (torch.bfloat16, torch.float16) if amp else dtype is None)
