"""The "earthengine" source against the real earthengine-api, faked only at its network edge.

ee.data.computePixels (and, for initialisation, the algorithm list download and the
Cloud API resource) are replaced; expressions are built and serialised by the real
library. The fake serves an analytic embedding field so every pixel can be checked.
"""

from __future__ import annotations

import filecmp
import json
import threading

import numpy as np
import pytest
import rasterio

ee = pytest.importorskip("ee")
from ee import apitestcase  # noqa: E402

from alphaearth_height.plugin.core import aef  # noqa: E402
from alphaearth_height.plugin.core.aoi import AreaOfInterest  # noqa: E402
from alphaearth_height.plugin.core.errors import InputError  # noqa: E402
from alphaearth_height.plugin.core.fetch import earthengine, estimate, fetch  # noqa: E402
from alphaearth_height.plugin.core.fetch.tiling import output_grid  # noqa: E402
from alphaearth_height.plugin.core.cancel import Cancelled  # noqa: E402

AOI = AreaOfInterest(-0.905, 45.001, -0.872, 45.019, "EPSG:4326")  # ~2.6 x 2 km in UTM 30N
LIMIT = 48 * 1024 * 1024


def field(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Unit-length (64, h, w) embeddings from global pixel indices; a masked strip where gx % 150 < 7."""
    k = np.arange(64, dtype=np.float64)[:, None, None]
    v = np.cos(0.011 * (k + 1) * gx[None] + 0.017 * gy[None] * (k % 5 + 1) + k)
    v = (v / np.linalg.norm(v, axis=0, keepdims=True)).astype(np.float32)
    v[:, (gx % 150) < 7] = np.nan
    return v


def truth_for(grid) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(grid.width), np.arange(grid.height))
    gx = round(grid.transform.c / 10) + cols
    gy = round(grid.transform.f / 10) - rows
    return aef.quantise(field(gx, gy))


class FakeEarthEngine:
    """computePixels that validates each request like the server would and records it."""

    def __init__(self, crs_code: str) -> None:
        self.crs_code = crs_code
        self.calls = 0
        self.requests: list[tuple[float, float, int, int]] = []
        self.fail_next: list[Exception] = []
        self.lock = threading.Lock()
        self.init_projects: list = []

    def compute_pixels(self, params: dict) -> np.ndarray:
        with self.lock:
            self.calls += 1
            if self.fail_next:
                raise self.fail_next.pop(0)
        assert params["fileFormat"] == "NUMPY_NDARRAY"
        assert params["bandIds"] == list(aef.BAND_NAMES)
        encoded = ee.serializer.encode(params["expression"])
        expression = json.dumps(encoded)
        assert "GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL" in expression and "2020-01-01" in expression
        # the image asked for is cast to float32 last, so 4 bytes per band hold whatever EE stores
        outer = encoded["values"][encoded["result"]]["functionInvocationValue"]
        assert outer["functionName"] == "Image.toFloat", outer["functionName"]
        grid = params["grid"]
        assert grid["crsCode"] == self.crs_code
        a = grid["affineTransform"]
        assert (a["scaleX"], a["scaleY"], a["shearX"], a["shearY"]) == (10, -10, 0, 0)
        assert a["translateX"] % 10 == 0 and a["translateY"] % 10 == 0
        w, h = grid["dimensions"]["width"], grid["dimensions"]["height"]
        assert 0 < w <= 32768 and 0 < h <= 32768 and w * h * 64 * 4 <= LIMIT
        with self.lock:
            self.requests.append((a["translateX"], a["translateY"], w, h))
        cols, rows = np.meshgrid(np.arange(w), np.arange(h))
        values = field(round(a["translateX"] / 10) + cols, round(a["translateY"] / 10) - rows)
        values = np.nan_to_num(values, nan=0.0)  # EE returns masked pixels as 0
        out = np.zeros((h, w), dtype=[(b, "<f4") for b in aef.BAND_NAMES])
        for i, b in enumerate(aef.BAND_NAMES):
            out[b] = values[i]
        return out


@pytest.fixture
def fake_ee(monkeypatch):
    fake = FakeEarthEngine("EPSG:32630")
    real_initialize = ee.Initialize

    def initialize(credentials="persistent", project=None, **kwargs):
        fake.init_projects.append(project)
        real_initialize(None, project=project)  # offline: no stored credentials needed

    monkeypatch.setattr(ee.data, "_install_cloud_api_resource", lambda: None)
    monkeypatch.setattr(ee.data, "getAlgorithms", apitestcase.GetAlgorithms)
    monkeypatch.setattr(ee, "Initialize", initialize)
    monkeypatch.setattr(ee.data, "computePixels", fake.compute_pixels)
    monkeypatch.setattr(earthengine, "_initialised", set())
    yield fake
    ee.Reset()


def _coverage(fake, grid) -> np.ndarray:
    counts = np.zeros((grid.height, grid.width), dtype=int)
    for tx, ty, w, h in fake.requests:
        c0, r0 = round((tx - grid.transform.c) / 10), round((grid.transform.f - ty) / 10)
        counts[r0:r0 + h, c0:c0 + w] += 1
    return counts


def test_fetch_tiles_cover_aoi_once_and_match_field(fake_ee, tmp_path):
    progress = []
    result = fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "cache", project="my-proj",
                   tile_size=100, progress=lambda d, t: progress.append((d, t)))
    grid = output_grid(AOI)
    assert fake_ee.init_projects == ["my-proj"]
    assert np.array_equal(_coverage(fake_ee, grid), np.ones((grid.height, grid.width), dtype=int))
    assert fake_ee.calls == result.tiles == result.fetched > 4
    with rasterio.open(result.path) as ds:
        data, tags = ds.read(), ds.tags()
        assert ds.crs.to_epsg() == 32630 and ds.transform == grid.transform and ds.nodata == -128
        assert ds.descriptions == aef.BAND_NAMES and ds.dtypes[0] == "int8"
    expected = truth_for(grid)
    assert (expected == aef.NODATA_INT8).any() and np.array_equal(data, expected)
    assert tags["ATTRIBUTION"] == aef.ATTRIBUTION and tags["YEAR"] == "2020" and "Earth Engine" in tags["SOURCE"]
    assert progress[-1] == (result.tiles, result.tiles)


def test_default_tiles_stay_under_request_limit(fake_ee, tmp_path):
    aoi = AreaOfInterest(-0.95, 45.0, -0.9, 45.03, "EPSG:4326")  # ~4 x 3.3 km: several 384 px tiles
    info = estimate(aoi, 2020, "earthengine", cache_dir=tmp_path, project="p")
    assert info["requests"] == info["tiles"] > 1 and info["download_bytes"] == info["pixels"] * 256
    assert fake_ee.calls == 0 and fake_ee.init_projects == []  # estimating contacts nobody
    result = fetch(aoi, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p")
    assert max(max(w, h) for _, _, w, h in fake_ee.requests) <= 384 and fake_ee.calls == info["requests"] > 1
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), truth_for(output_grid(aoi)))


def test_second_run_reads_cache(fake_ee, tmp_path):
    kwargs = dict(cache_dir=tmp_path / "cache", project="p", tile_size=128)
    first = fetch(AOI, 2020, "earthengine", tmp_path / "a.tif", **kwargs)
    calls = fake_ee.calls
    earthengine._initialised.clear()
    second = fetch(AOI, 2020, "earthengine", tmp_path / "b.tif", **kwargs)
    assert fake_ee.calls == calls and second.fetched == 0 and second.from_cache == first.tiles
    assert fake_ee.init_projects == ["p"]  # a fully cached area needs no log-in
    assert filecmp.cmp(first.path, second.path, shallow=False)
    assert estimate(AOI, 2020, "earthengine", **kwargs)["requests"] == 0


def test_cancel_then_resume_gives_same_file(fake_ee, tmp_path):
    kwargs = dict(project="p", tile_size=80, workers=2)
    reference = fetch(AOI, 2020, "earthengine", tmp_path / "ref.tif", cache_dir=tmp_path / "c1", **kwargs)
    fake_ee.calls = 0
    with pytest.raises(Cancelled):
        fetch(AOI, 2020, "earthengine", tmp_path / "out.tif", cache_dir=tmp_path / "c2",
              cancel=lambda: fake_ee.calls >= 5, **kwargs)
    assert not (tmp_path / "out.tif").exists()
    assert not list((tmp_path / "c2").rglob("*.partial*"))
    interrupted = fake_ee.calls
    resumed = fetch(AOI, 2020, "earthengine", tmp_path / "out.tif", cache_dir=tmp_path / "c2", **kwargs)
    assert resumed.from_cache >= 5 and fake_ee.calls - interrupted == resumed.fetched
    assert resumed.fetched + resumed.from_cache == reference.tiles
    assert filecmp.cmp(reference.path, resumed.path, shallow=False)


def test_quota_errors_are_retried(fake_ee, tmp_path):
    fake_ee.fail_next = [ee.ee_exception.EEException("Too Many Requests: quota exceeded (429)"),
                         ee.ee_exception.EEException("Service Unavailable (503)")]
    result = fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p",
                   retry_delay=0.01)
    assert fake_ee.calls == result.tiles + 2
    with rasterio.open(result.path) as ds:
        assert np.array_equal(ds.read(), truth_for(output_grid(AOI)))


def test_permanent_error_is_one_line(fake_ee, tmp_path):
    fake_ee.fail_next = [ee.ee_exception.EEException("Image.select: Pattern 'A00' did not match any bands.")]
    with pytest.raises(InputError, match="Pattern 'A00'"):
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p", workers=1)
    assert fake_ee.calls == 1 and not (tmp_path / "e.tif").exists()


def test_missing_credentials_say_how_to_authenticate(monkeypatch, tmp_path):
    """The real ee.Initialize, with no stored credentials and no metadata server."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("CLOUDSDK_CONFIG", raising=False)
    monkeypatch.setattr(earthengine, "_initialised", set())
    with pytest.raises(InputError) as err:
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p")
    assert "not authenticated" in err.value.problem and "earthengine authenticate" in err.value.fix
    ee.Reset()


def test_missing_project_says_how_to_set_it(monkeypatch, tmp_path):
    def no_project(*args, **kwargs):
        raise ee.ee_exception.EEException(ee.NO_PROJECT_EXCEPTION)

    monkeypatch.setattr(ee, "Initialize", no_project)
    monkeypatch.setattr(earthengine, "_initialised", set())
    for name in earthengine.PROJECT_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError) as err:
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c")
    assert "Cloud project" in err.value.problem and "--project" in err.value.fix
    with pytest.raises(InputError, match="outside what one Earth Engine request allows"):
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", tile_size=512)


REQUEST_SIZE = ("Total request size (56623104 bytes) must be less than or equal to 50331648 bytes.")


@pytest.mark.parametrize("message, transient", [
    ("Too Many Requests: quota exceeded (429)", True),
    ("Service Unavailable (503)", True),
    ("HTTP Error 502: Bad Gateway", True),
    ("<HttpError 500 when requesting https://earthengine.googleapis.com/...>", True),
    ("Computation timed out.", True),
    (REQUEST_SIZE, False),                                   # holds "503" inside 50331648
    ("Invalid argument: grid dimensions must be positive", False),
    ("Request payload size exceeds the limit: 10485760 bytes.", False),
    ("Image.select: Pattern 'A00' did not match any bands.", False),
    ("Image.load: Image asset 'x' not found (does not exist or caller does not have access).", False),
    ("Total request size (5030 bytes) is fine but code 4290 is not a status", False),
])
def test_transient_errors_are_whole_status_codes(message, transient):
    assert earthengine.is_transient(ee.ee_exception.EEException(message)) is transient


def test_request_size_error_is_permanent_and_says_so(fake_ee, tmp_path):
    fake_ee.fail_next = [ee.ee_exception.EEException(REQUEST_SIZE)]
    with pytest.raises(InputError) as err:
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p", workers=1,
              retry_delay=0.01)
    assert fake_ee.calls == 1  # not retried
    assert "too large" in err.value.problem and "50331648" in err.value.problem and "tile size" in err.value.fix
    assert not (tmp_path / "e.tif").exists()


def test_transient_errors_stop_at_the_tile_deadline(fake_ee, tmp_path, monkeypatch):
    """A server that keeps answering 503 is retried only while the tile deadline allows."""
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_TILE_DEADLINE", "1.5")
    fake_ee.fail_next = [ee.ee_exception.EEException("Service Unavailable (503)")] * 1000
    with pytest.raises(InputError) as err:
        fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p", workers=1,
              retries=1000, retry_delay=0.2, tile_size=400)
    assert "503" in err.value.problem and "1.5 s tile deadline" in err.value.problem
    assert 2 <= fake_ee.calls < 20


def test_earth_engine_gets_a_request_timeout(fake_ee, tmp_path, monkeypatch):
    """Without one an Earth Engine request may wait forever: the tile deadline becomes its HTTP timeout."""
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_TILE_DEADLINE", "123")
    fetch(AOI, 2020, "earthengine", tmp_path / "e.tif", cache_dir=tmp_path / "c", project="p", tile_size=400)
    assert ee.data._get_state().deadline_ms == 123_000
