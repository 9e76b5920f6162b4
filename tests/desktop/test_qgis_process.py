"""The plugin's Processing algorithms through qgis_process, with the desktop tests' fresh
profile (release zip installed and enabled there; QGIS_CUSTOM_CONFIG_PATH points at it)."""

from __future__ import annotations

import json
import subprocess

import pytest
import rasterio
from rasterio.windows import Window

from .desktop_harness import clean_environment, make_profile, qgis_process_command

ALGORITHMS = ("alphaearth_height:predictheight", "alphaearth_height:compareheights",
              "alphaearth_height:correctbias", "alphaearth_height:fetchembeddings", "alphaearth_height:trainmodel")


@pytest.fixture(scope="module")
def small_embeddings(demo_scene, tmp_path_factory):
    """A 256 x 256 px window of the demo embeddings (same CRS, pixel size and nodata)."""
    path = tmp_path_factory.mktemp("qgis-process") / "embeddings_256.tif"
    with rasterio.open(demo_scene / "embeddings.tif") as src:
        window = Window(384, 384, 256, 256)
        profile = src.profile.copy()
        profile.update(width=256, height=256, transform=src.window_transform(window))
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def test_qgis_process_lists_the_plugin_algorithms(qgis_process):
    done = qgis_process("plugins")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "* alphaearth_height" in done.stdout, done.stdout
    done = qgis_process("list")
    assert done.returncode == 0, done.stdout + done.stderr
    for algorithm in ALGORITHMS:
        assert algorithm in done.stdout, f"{algorithm} missing from qgis_process list:\n{done.stdout[:3000]}"


def test_qgis_process_predicts_height_on_the_input_grid(qgis_process, desktop_run, small_embeddings, tmp_path):
    if not desktop_run.env_dir.is_dir():
        pytest.skip(f"the plugin's worker environment was not installed ({desktop_run.env_dir} missing; "
                    "see the desktop test)")
    out = tmp_path / "height.tif"
    done = qgis_process("--json", "run", "alphaearth_height:predictheight", "--",
                        f"INPUT={small_embeddings}", f"OUTPUT={out}", timeout=300)
    assert done.returncode == 0, f"{' '.join(qgis_process.command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["results"]["OUTPUT"] == str(out), report.get("results")
    assert out.is_file()
    with rasterio.open(small_embeddings) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs
        assert dst.transform.almost_equals(src.transform)
        assert (dst.width, dst.height) == (src.width, src.height)
        assert dst.count == 1
        heights = dst.read(1, masked=True)
        assert heights.count() > 0.9 * heights.size


def test_qgis_process_without_the_environment_says_how_to_get_it(release_zip, small_embeddings, tmp_path):
    """A profile where the plugin is installed but its environment is not: a clear error, no output."""
    profiles = tmp_path / "profiles"
    make_profile(profiles, release_zip)
    out = tmp_path / "height.tif"
    env = clean_environment(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(profiles))
    done = subprocess.run([*qgis_process_command(), "run", "alphaearth_height:predictheight", "--",
                           f"INPUT={small_embeddings}", f"OUTPUT={out}"], env=env, capture_output=True, text=True,
                          timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "environment" in text and "Install" in text, text[-3000:]
    assert not out.exists()
