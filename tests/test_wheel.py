"""A normal (non-editable) wheel, installed into a fresh venv, runs the demo from outside the checkout.

The wheel is built offline (``--no-build-isolation``: the running Python's setuptools)
from a copy of the checkout, so the test neither writes build/ into the shared tree nor
leans on its leftovers. The fresh venv is made from the same base interpreter with
``--system-site-packages`` (Debian's GDAL, rasterio, numpy, as the README's set-up does);
the PyPI packages (torch, ONNX Runtime…) come from the running environment through a
``.pth`` line placed after the venv's own site-packages, since the test must not download.
The package itself is imported from the venv, never the checkout: the test asserts it.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", "build", "dist", "demo_output", "test-artifacts", "*.egg-info", "__pycache__",
              ".pytest_cache")
PACKAGES = {"alphaearth_height", "alphaearth_height/plugin", "alphaearth_height/plugin/core",
            "alphaearth_height/plugin/core/fetch", "alphaearth_height/plugin/processing",
            "alphaearth_height/plugin/ui", "alphaearth_height/training"}
DEMO_OUTPUTS = ("embeddings.tif", "reference_dsm.tif", "predicted_height.tif", "difference.tif", "metrics.json",
                "height_maps.png")


def _checkout_version() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string((ROOT / "metadata.txt").read_text(encoding="utf-8"))
    return parser["general"]["version"]


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH: the venv must find the package on its own."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", "-w", str(work / "dist"), str(source)],
                   check=True, capture_output=True, text=True, cwd=work)
    (built,) = (work / "dist").glob("alphaearth_height-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv from the base interpreter, the wheel installed into it normally."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    base = Path(sys.base_exec_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--system-site-packages", str(folder)], check=True,
                   capture_output=True, text=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                    "-q", str(wheel)], check=True, capture_output=True, text=True, env=_clean_env())
    own = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    if sys.prefix != sys.base_prefix:  # the test runs in a venv: lend its PyPI packages, after the venv's own
        (own / "zz_lend_test_packages.pth").write_text(ours + "\n")
    return folder


def _python(venv: Path, code: str, cwd: Path) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_holds_only_the_real_packages_and_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode("utf-8")
    code = [n for n in names if n.endswith(".py")]
    assert {str(Path(n).parent) for n in code} == PACKAGES
    for data in ("metadata.txt", "resources/icon.png", "resources/models/demo-unetplusplus/model.onnx",
                 "resources/models/demo-unetplusplus/model.safetensors",
                 "resources/models/demo-unetplusplus/model.json", "resources/requirements/core.txt"):
        assert f"alphaearth_height/{data}" in names, data
    assert f"Version: {_checkout_version()}\n" in meta
    assert "Requires-Dist: onnxruntime>=1.17\n" in meta and 'Requires-Dist: earthengine-api; extra == "earthengine"' in meta
    assert not any("torch" in line and "extra ==" not in line for line in meta.splitlines()
                   if line.startswith("Requires-Dist:")), "torch is the [train] extra, not a core dependency"


def test_the_installed_package_is_the_wheels_with_its_data(venv, tmp_path):
    code = ("import importlib.metadata as m, json, alphaearth_height as a;"
            "from alphaearth_height.plugin.core.models import bundled_model_dir;"
            "from alphaearth_height.plugin.environment import INFERENCE;"
            "print(json.dumps({'file': a.__file__, 'version': a.__version__, 'dist': m.version('alphaearth-height'),"
            "'model': str(bundled_model_dir()), 'model_ok': (bundled_model_dir() / 'model.onnx').is_file(),"
            "'ee': INFERENCE.get('ee'), 'core': m.requires('alphaearth-height')}))")
    found = json.loads(_python(venv, code, tmp_path))
    assert Path(found["file"]).is_relative_to(venv), found["file"]
    assert found["version"] == found["dist"] == _checkout_version()
    assert Path(found["model"]).is_relative_to(venv) and found["model_ok"]
    assert found["ee"] == "earthengine-api"
    assert "onnxruntime>=1.17" in found["core"]


@pytest.mark.parametrize("folder", ["tests", "bench", "scripts"])
def test_developer_folders_are_not_packages(venv, tmp_path, folder):
    done = subprocess.run([str(venv / "bin" / "python"), "-c", f"import alphaearth_height.{folder}"],
                          capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert done.returncode != 0 and f"No module named 'alphaearth_height.{folder}'" in done.stderr


def test_the_demo_runs_from_a_folder_outside_the_checkout(venv, tmp_path):
    """The issue's 'done': the console script of the installed wheel, the bundled model, every output."""
    done = subprocess.run([str(venv / "bin" / "alphaearth-height"), "demo", "--out", "out", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    assert set(DEMO_OUTPUTS) <= {p.name for p in out.iterdir()}  # plus the evaluation report's plots
    with rasterio.open(out / "predicted_height.tif") as src:
        heights = src.read(1, masked=True)
        assert src.crs.to_string() == "EPSG:32630" and src.width == src.height == 1024
    assert heights.count() > 0.9 * heights.size and np.isfinite(heights.compressed()).all()
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["r2"] > 0.8, overall  # the bundled model, not an untrained net (about 0.98)
