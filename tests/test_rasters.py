import os
import stat
import tempfile

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.rasters import EmbeddingRaster, atomic_write, current_umask, honour_umask

from conftest import ORIGIN, unit_embeddings, write_embeddings


def test_bottom_up_raster_reads_like_its_north_up_twin(tmp_path):
    values = unit_embeddings(40, 56)
    north = write_embeddings(tmp_path / "north.tif", values)
    south = write_embeddings(tmp_path / "south.tif", values, bottom_up=True)
    with rasterio.open(south) as raw:
        assert raw.transform.e > 0  # really stored bottom-up
    with EmbeddingRaster(north) as a, EmbeddingRaster(south) as b:
        assert b.bottom_up and not a.bottom_up
        assert a.grid == b.grid
        assert b.grid.transform.e == -10.0 and b.grid.transform.f == ORIGIN[1]
        for window in (Window(0, 0, 56, 40), Window(5, 3, 17, 11), Window(50, 30, 20, 20)):
            np.testing.assert_array_equal(a.read(window), b.read(window))


def test_window_beyond_the_edge_is_nan_padded(tmp_path):
    path = write_embeddings(tmp_path / "e.tif", unit_embeddings(16, 16))
    with EmbeddingRaster(path) as src:
        block = src.read(Window(8, 8, 16, 16))
    assert block.shape == (64, 16, 16)
    assert np.isfinite(block[:, :8, :8]).all()
    assert np.isnan(block[:, 8:, :]).all() and np.isnan(block[:, :, 8:]).all()


def test_int8_nodata_becomes_nan_and_float_nodata_too(tmp_path):
    values = unit_embeddings(16, 16)
    values[:, 2, 3] = np.nan
    q = write_embeddings(tmp_path / "q.tif", values)
    floats = values.copy()
    floats[:, 2, 3] = -9999.0
    f = write_embeddings(tmp_path / "f.tif", floats, quantised=False, nodata=-9999.0)
    for path in (q, f):
        with EmbeddingRaster(path) as src:
            block = src.read(Window(0, 0, 16, 16))
        assert np.isnan(block[:, 2, 3]).all()
        assert np.isfinite(block[:, 2, 4]).all()


@pytest.mark.parametrize("kind", ["int8", "int8 bottom-up", "float"])
def test_model_input_is_read_with_missing_pixels_zeroed(tmp_path, kind):
    """What the model gets equals ``read`` with NaN as 0, and the mask is ``read``'s finite pixels:
    inside the raster (the one-pass int8 path) and over its edge (the padded path)."""
    values = unit_embeddings(40, 56)
    values[:, 2, 3] = np.nan
    values[7, 10, 11] = np.nan  # one band missing: the pixel is invalid
    if kind == "float":
        values[:, 20, 20] = np.inf
        path = write_embeddings(tmp_path / "e.tif", values, quantised=False)
    else:
        path = write_embeddings(tmp_path / "e.tif", values, bottom_up=kind.endswith("bottom-up"))
    with EmbeddingRaster(path) as src:
        for window in (Window(0, 0, 32, 32), Window(24, 8, 32, 32), Window(40, 30, 32, 32)):
            expected = src.read(window)
            out = np.full(expected.shape, 99.0, dtype=np.float32)
            mask = src.read_model_input(window, out)
            np.testing.assert_array_equal(mask, np.isfinite(expected).all(axis=0))
            np.testing.assert_array_equal(out, np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0))
            if window.col_off == 0:
                assert not mask[2, 3] and not mask[10, 11] and mask[2, 4]


def _write_plain(path, count, dtype="float32", crs="EPSG:32630"):
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": count, "dtype": dtype, "crs": crs,
               "transform": rasterio.transform.from_origin(*((0.5, 45.0) if crs == "EPSG:4326" else ORIGIN),
                                                           *((0.0001, 0.0001) if crs == "EPSG:4326" else (10, 10)))}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((count, 8, 8), dtype=dtype))
    return path


@pytest.mark.parametrize("case, expected", [
    ("bands", "has 3 band(s) but embeddings need 64"),
    ("geographic", "geographic CRS"),
    ("dtype", "data type uint16"),
    ("unreadable", "cannot be read as a raster"),
    ("missing", "does not exist"),
    ("nocrs", "has no coordinate reference system"),
])
def test_bad_embeddings_name_the_file_problem_and_fix(tmp_path, case, expected):
    path = tmp_path / f"{case}.tif"
    if case == "bands":
        _write_plain(path, 3)
    elif case == "geographic":
        _write_plain(path, 64, crs="EPSG:4326")
    elif case == "dtype":
        _write_plain(path, 64, dtype="uint16")
    elif case == "unreadable":
        path.write_bytes(b"this is not a GeoTIFF")
    elif case == "nocrs":
        with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=64, dtype="float32") as dst:
            dst.write(np.zeros((64, 4, 4), dtype="float32"))
    with pytest.raises(InputError) as err:
        EmbeddingRaster(path)
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message and len(message.split(". ")) >= 2  # problem, then the fix


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"  # a .tif is checked as a raster before the rename (tested below)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        with open(tmp, "w") as fh:
            fh.write("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_outputs_honour_the_umask(umask, tmp_path):
    """mkstemp's 0600 must not leak into the outputs: a GeoTIFF and a JSON file get 0666 & ~umask."""
    assert current_umask() == umask
    raster, text = tmp_path / "height.tif", tmp_path / "metrics.json"
    with atomic_write(raster) as tmp:
        with rasterio.open(tmp, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32") as dst:
            dst.write(np.zeros((1, 4, 4), dtype=np.float32))
    with atomic_write(text) as tmp:
        with open(tmp, "w") as fh:
            fh.write("{}")
    assert mode(raster) == mode(text) == 0o666 & ~umask


def test_temporary_folders_honour_the_umask(umask, tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)
    assert mode(folder) == 0o700
    honour_umask(folder, directory=True)
    assert mode(folder) == 0o777 & ~umask


def test_crop_of_a_bottom_up_raster_is_north_up(tmp_path):
    """Bottom-up files (as the public AEF COGs) are cropped as they are read everywhere: north-up."""
    from affine import Affine

    from alphaearth_height.plugin.core.rasters import Grid, crop_to_grid

    north_up = np.arange(3 * 40 * 30, dtype=np.float32).reshape(3, 40, 30)
    src = tmp_path / "bottom_up.tif"
    with rasterio.open(src, "w", driver="GTiff", width=30, height=40, count=3, dtype="float32", crs="EPSG:32630",
                       transform=Affine(10, 0, 500_000, 0, 10, 4_000_000)) as ds:  # y grows with the row
        ds.write(north_up[:, ::-1, :])
    top = 4_000_000 + 40 * 10
    grid = Grid(rasterio.crs.CRS.from_epsg(32630), Affine(10, 0, 500_050, 0, -10, top - 70), 12, 9)
    crop_to_grid(src, tmp_path / "crop.tif", grid)
    with rasterio.open(tmp_path / "crop.tif") as out:
        assert out.transform == grid.transform and out.transform.e < 0
        assert np.array_equal(out.read(), north_up[:, 7:16, 5:17])
