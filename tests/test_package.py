"""The release zip (scripts/package.py) and its installer (scripts/install_plugin.py)."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("name", "qgisMinimumVersion", "qgisMaximumVersion", "description", "about", "version", "author",
                 "email", "repository", "tracker", "homepage", "icon", "category", "tags", "experimental",
                 "hasProcessingProvider", "changelog")
EXCLUDED_PARTS = {"tests", "bench", "scripts", ".git", ".venv", "__pycache__", "build", "dist", "demo_output",
                  "test-artifacts", ".ci"}
EXCLUDED_TOP = {"Makefile", "pyproject.toml", ".gitignore"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out)], check=True,
                   capture_output=True, text=True)
    return out / "alphaearth_height.zip"


@pytest.fixture(scope="module")
def names(release) -> list[str]:
    with zipfile.ZipFile(release) as archive:
        assert archive.testzip() is None
        return archive.namelist()


def metadata(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys such as qgisMinimumVersion are case-sensitive for QGIS
    parser.read_string(text)
    return parser["general"]


def test_one_top_folder_with_the_plugin_entry_points(names):
    assert {name.split("/", 1)[0] for name in names} == {"alphaearth_height"}
    for required in ("__init__.py", "metadata.txt", "cli.py", "README.md", "resources/icon.png",
                     "plugin/processing/provider.py", "plugin/core/inference.py", "training/train.py"):
        assert f"alphaearth_height/{required}" in names, required


def test_no_tests_caches_or_developer_files(names):
    for name in names:
        parts = Path(name).parts[1:]
        assert not EXCLUDED_PARTS & set(parts), name
        assert parts[0] not in EXCLUDED_TOP, name
        assert not name.endswith((".pyc", ".pyo")), name
        assert not any(part.startswith(".") for part in parts), name


def test_resources_come_from_the_repository(names):
    for name in names:
        relative = Path(*Path(name).parts[1:])
        if relative.parts[0] == "resources":
            assert (ROOT / relative).is_file(), name


def test_size_under_the_plugin_repository_limit(release):
    assert release.stat().st_size < 25 * 1000 * 1000


def test_bundled_model_runs_on_onnx_runtime_from_the_zip(release, tmp_path):
    """The zip's model folder alone (graph + weights it points into) is enough for ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    folder = "alphaearth_height/resources/models/demo-unetplusplus/"
    with zipfile.ZipFile(release) as archive:
        members = [n for n in archive.namelist() if n.startswith(folder)]
        assert folder + "model.onnx" in members and folder + "model.safetensors" in members
        archive.extractall(tmp_path, members)
    session = ort.InferenceSession(str(tmp_path / folder / "model.onnx"), providers=["CPUExecutionProvider"])
    heights = session.run(None, {"embeddings": np.zeros((1, 64, 64, 64), dtype=np.float32)})[0]
    assert heights.shape == (1, 1, 64, 64) and np.isfinite(heights).all()


def test_metadata_is_complete_and_carries_the_checkouts_version(release):
    with zipfile.ZipFile(release) as archive:
        general = metadata(archive.read("alphaearth_height/metadata.txt").decode("utf-8"))
    missing = [key for key in REQUIRED_KEYS if not general.get(key, "").strip()]
    assert not missing
    assert general["name"] == "AlphaEarth Height"
    assert general["qgisMinimumVersion"] == "3.22" and general["qgisMaximumVersion"] == "4.99"
    assert general["hasProcessingProvider"] == "yes"
    assert "CC-BY 4.0" in general["about"] and "Hamoudzadeh" in general["about"]
    assert (ROOT / general["icon"]).is_file()
    assert general["version"] == metadata((ROOT / "metadata.txt").read_text(encoding="utf-8"))["version"]


def test_the_installed_copy_reads_its_version_and_requirement_lists(release, tmp_path):
    """metadata.txt is the one version and resources/requirements the one set of lists, in the zip too."""
    with zipfile.ZipFile(release) as archive:
        archive.extractall(tmp_path)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import alphaearth_height as a;"
            "from alphaearth_height.plugin import environment as e;"
            "print(json.dumps([a.__file__, a.__version__, e.INFERENCE, e.TRAINING]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, text=True)
    init, version, inference, training = json.loads(done.stdout)
    assert Path(init).is_relative_to(tmp_path)
    general = metadata((tmp_path / "alphaearth_height" / "metadata.txt").read_text(encoding="utf-8"))
    assert version == general["version"]
    assert inference["onnxruntime"] == "onnxruntime>=1.17" and inference["ee"] == "earthengine-api"
    assert training["segmentation_models_pytorch"].startswith("segmentation-models-pytorch") and "torch" not in inference


def test_install_replaces_an_older_copy(release, tmp_path):
    plugins = tmp_path / "profile" / "python" / "plugins"
    stale = plugins / "alphaearth_height" / "stale.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("old copy\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "install_plugin.py"), "--zip", str(release),
                    "--profile-dir", str(tmp_path / "profile")], check=True, capture_output=True, text=True)
    assert [p.name for p in plugins.iterdir()] == ["alphaearth_height"]
    assert (plugins / "alphaearth_height" / "metadata.txt").is_file()
    assert not stale.exists()


def test_installed_copy_imports_on_its_own(release, tmp_path):
    """The provider loads from the installed folder alone, not from the development checkout."""
    pytest.importorskip("qgis.core")
    profile = tmp_path / "profile"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "install_plugin.py"), "--zip", str(release),
                    "--profile-dir", str(profile)], check=True, capture_output=True, text=True)
    plugins = profile / "python" / "plugins"
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from alphaearth_height.plugin.processing import provider;"
            "assert provider.__file__.startswith(sys.argv[1]), provider.__file__;"
            "print(provider.AlphaEarthHeightProvider().id(), len(provider.ALGORITHMS))")
    done = subprocess.run([sys.executable, "-c", code, str(plugins)], check=True, capture_output=True, text=True,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert done.stdout.split() == ["alphaearth_height", "5"]
