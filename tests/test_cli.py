import subprocess
import sys
from pathlib import Path

import pytest

from conftest import unit_embeddings, write_embeddings

CLI = Path(sys.executable).parent / "alphaearth-height"


def run(*args):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["", "fetch", "predict", "compare", "train", "demo"])
def test_help_everywhere(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0 and "usage: alphaearth-height" in result.stdout


def test_predict_and_compare_from_the_command_line(tiny_model, small_scene, tmp_path):
    height = tmp_path / "h.tif"
    result = run("predict", "--embeddings", small_scene.embeddings, "--model", tiny_model, "--out", height,
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert height.exists() and "wrote" in result.stdout
    result = run("compare", "--predicted", height, "--reference", small_scene.reference,
                 "--out", tmp_path / "d.tif", "--metrics", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d.tif").exists() and (tmp_path / "m.json").exists() and "rmse" in result.stdout


def test_predict_size_limit_from_the_environment_and_the_options(tiny_model, small_scene, tmp_path, monkeypatch):
    """256 x 256 px = 0.066 Mpx: refused under a lower limit ($ALPHAEARTH_HEIGHT_MAX_MPX or --max-mpx),
    run with --yes or a higher --max-mpx."""
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_MAX_MPX", "0.05")
    base = ["predict", "--embeddings", small_scene.embeddings, "--model", tiny_model, "--device", "cpu"]
    refused = run(*base, "--out", tmp_path / "a.tif")
    assert refused.returncode == 2 and "above the limit of 0.05 Mpx" in refused.stderr and "--yes" in refused.stderr
    assert run(*base, "--out", tmp_path / "a.tif", "--max-mpx", "0.07").returncode == 0
    monkeypatch.delenv("ALPHAEARTH_HEIGHT_MAX_MPX")
    assert run(*base, "--out", tmp_path / "b.tif", "--max-mpx", "0.06").returncode == 2
    assert run(*base, "--out", tmp_path / "b.tif", "--max-mpx", "0.06", "--yes").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]


def test_bad_input_exits_nonzero_with_one_line_and_no_output(tiny_model, tmp_path):
    bad = write_embeddings(tmp_path / "three.tif", unit_embeddings(16, 16)[:3], quantised=False)
    out = tmp_path / "h.tif"
    result = run("predict", "--embeddings", bad, "--model", tiny_model, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alphaearth-height: error:") and str(bad) in lines[0]
    assert not out.exists()
    result = run("predict", "--embeddings", bad, "--model", tmp_path / "nope", "--out", out)
    assert result.returncode == 2 and "is not a model folder" in result.stderr


def test_fetch_prints_the_size_before_fetching(small_scene, tmp_path):
    left, bottom, right, top = small_scene.grid.bounds
    out = tmp_path / "aoi.tif"
    result = run("fetch", "--source", "local", "--local-raster", small_scene.embeddings, "--aoi", left + 200,
                 bottom + 300, left + 1200, bottom + 1000, "--aoi-crs", "EPSG:32630", "--year", 2020, "--out", out,
                 "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout.index("wrote") > 0 and "px" in result.stdout.splitlines()[0]
    import rasterio

    with rasterio.open(out) as src:
        assert (src.width, src.height, src.count) == (100, 70, 64) and src.dtypes[0] == "int8"
