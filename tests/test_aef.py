import numpy as np
import pytest

from alphaearth_height.plugin.core import aef


def test_dequantise_matches_hand_computed_values():
    q = np.array([0, 1, -1, 64, -64, 127, -127, -128], dtype=np.int8)
    v = aef.dequantise(q)
    expected = [0.0, 1 / 16256.25, -1 / 16256.25, 4096 / 16256.25, -4096 / 16256.25,
                16129 / 16256.25, -16129 / 16256.25]
    np.testing.assert_allclose(v[:7], expected, rtol=1e-6)
    assert np.isnan(v[7])
    assert v.dtype == np.float32


def test_dequantise_into_a_buffer_with_nodata_as_zero():
    """The model's variant: every code as the formula gives it (float32), -128 as 0, into ``out``."""
    q = np.arange(-128, 128, dtype=np.int8).reshape(2, 8, 16)
    out = np.full(q.shape, 7.0, dtype=np.float32)
    assert aef.dequantise(q, out=out, nodata="zero") is out
    scaled = q.astype(np.float64) / 127.5
    expected = np.where(q == aef.NODATA_INT8, 0.0, np.sign(scaled) * scaled ** 2)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.isnan(aef.dequantise(q)), q == aef.NODATA_INT8)


def test_dequantise_is_the_same_across_its_chunks_and_into_a_strided_buffer():
    """A tile is looked up a chunk at a time: values on both sides of every chunk boundary,
    and a buffer with no flat view (a column slice) get the formula's values too."""
    q = np.random.default_rng(3).integers(-128, 128, (3, 400, 500)).astype(np.int8)  # 600 000 values: 3 chunks
    scaled = q.astype(np.float64) / 127.5
    expected = np.where(q == aef.NODATA_INT8, 0.0, np.sign(scaled) * scaled ** 2)
    np.testing.assert_allclose(aef.dequantise(q, nodata="zero"), expected, rtol=1e-6, atol=0)
    wide = np.full((3, 400, 600), 7.0, dtype=np.float32)
    aef.dequantise(q, out=wide[:, :, 50:550], nodata="zero")
    np.testing.assert_allclose(wide[:, :, 50:550], expected, rtol=1e-6, atol=0)
    assert (wide[:, :, :50] == 7.0).all() and (wide[:, :, 550:] == 7.0).all()


def test_int8_rasters_are_written_like_the_published_tiles(tmp_path):
    """Band by band, ZSTD (this GDAL has it): the profile fetch, the tile cache and the demo write."""
    import rasterio
    from affine import Affine

    path = tmp_path / "e.tif"
    q = np.random.default_rng(0).integers(-128, 128, (aef.N_BANDS, 300, 260)).astype(np.int8)
    with rasterio.open(path, "w", **aef.int8_profile(260, 300, "EPSG:32630", Affine(10, 0, 5e5, 0, -10, 5e6))) as dst:
        dst.write(q)
    with rasterio.open(path) as src:
        assert src.profile["compress"] == "zstd" and src.profile["interleave"] == "band"
        assert src.block_shapes[0] == (256, 256) and src.nodata == aef.NODATA_INT8
        np.testing.assert_array_equal(src.read(), q)


def test_dequantise_is_not_the_linear_bug():
    assert aef.dequantise(np.array([64], dtype=np.int8))[0] == pytest.approx(0.2520, abs=1e-4)
    assert aef.dequantise(np.array([64], dtype=np.int8))[0] != pytest.approx(64 / 127.5, abs=1e-3)


def test_quantise_round_trips_every_code():
    q = np.arange(-127, 128, dtype=np.int8)
    np.testing.assert_array_equal(aef.quantise(aef.dequantise(q)), q)
    assert aef.quantise(np.array([np.nan], dtype=np.float32))[0] == aef.NODATA_INT8


def test_quantise_is_the_official_encoder():
    v = np.array([0.25, -0.25, 1.0, -1.0, 0.0], dtype=np.float32)
    # q = clip(round(sign(v) * sqrt(|v|) * 127.5), -127, 127)
    np.testing.assert_array_equal(aef.quantise(v), [64, -64, 127, -127, 0])
