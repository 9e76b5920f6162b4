"""The plugin-managed Python environment: a real venv, real pip (the machine's registry), the lean set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from alphaearth_height.plugin.core.models import bundled_model_dir
from alphaearth_height.plugin.environment import (INFERENCE, PYTHON_OVERRIDE, InstallPlan, ManagedEnvironment,
                                                   SetupError, system_python, worker_python)

from conftest import unit_embeddings, write_embeddings

REPO = Path(__file__).resolve().parents[1]
MAX_LEAN_BYTES = 300e6


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    env = ManagedEnvironment(tmp_path_factory.mktemp("profile") / "env", base_python=system_python())
    lines: list[str] = []
    plan = env.plan("inference", lines.append)
    env.install("inference", lines.append)
    return env, plan, lines


def test_the_plan_lists_what_pip_would_download_with_sizes(installed):
    env, plan, _ = installed
    names = [name for name, _, _ in plan.packages]
    assert "onnxruntime" in names
    assert "torch" not in names, "the lean set never pulls torch"
    assert plan.total_bytes is not None and 1e6 < plan.total_bytes < MAX_LEAN_BYTES
    assert plan.describe().startswith("download ") and "onnxruntime" in plan.describe()


def test_the_lean_install_is_small_and_ready(installed):
    env, _, lines = installed
    assert env.is_ready("inference") and not env.is_ready("training")
    size = env.size_bytes()
    print(f"\nlean environment: {size / 1e6:.0f} MB at {env.folder}")
    assert size < MAX_LEAN_BYTES
    imports = subprocess.run([str(env.python), "-c", "import " + ", ".join(INFERENCE) + "; import torch"],
                             capture_output=True, text=True)
    assert "No module named 'torch'" in imports.stderr, imports.stderr
    assert any("onnxruntime" in line for line in lines)


def test_add_dask_installs_the_cluster_set_on_top(installed):
    """The dock's 'Add Dask': dask and distributed from the registry into the lean environment."""
    from alphaearth_height.plugin.environment import DASK
    from alphaearth_height.plugin.tasks import worker_has_dask

    env, _, _ = installed
    assert not worker_has_dask(str(env.python))
    env.install("dask", lambda line: None)
    assert env.is_ready("dask") and env.is_ready("inference") and not env.is_ready("training")
    assert sorted(env.installed_sets()) == ["dask", "inference"]
    assert worker_has_dask(str(env.python)) and set(DASK) == {"dask", "distributed"}


def _serve_in(env: ManagedEnvironment, tmp_path: Path, request: dict) -> tuple[int, list[dict], str]:
    """The worker in the lean environment, with the plugin importable as the plugin folder makes it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    if not (plugins / "alphaearth_height").exists():
        (plugins / "alphaearth_height").symlink_to(REPO, target_is_directory=True)
    boot = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            "from alphaearth_height.plugin.core.worker import serve; code = serve(); "
            "print(json.dumps({'torch_loaded': 'torch' in sys.modules})); sys.exit(code)")
    proc = subprocess.run([str(env.python), "-c", boot, str(plugins)], input=json.dumps(request),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_the_lean_environment_runs_a_prediction_without_torch(installed, tmp_path):
    """The worker, started as the plugin starts it, predicts with ONNX Runtime and never imports torch."""
    env, _, _ = installed
    embeddings = write_embeddings(tmp_path / "emb.tif", unit_embeddings(96, 96, seed=1))
    out = tmp_path / "h.tif"
    request = {"action": "predict", "params": {"embeddings": str(embeddings), "model": str(bundled_model_dir()),
                                               "out": str(out)}}
    code, events, stderr = _serve_in(env, tmp_path, request)
    assert code == 0, stderr
    result = next(e["value"] for e in events if e.get("event") == "result")
    assert "ONNX Runtime" in result["device"]
    assert events[-1] == {"torch_loaded": False}
    with rasterio.open(out) as src:
        assert src.width == 96 and src.crs.to_string() == "EPSG:32630"


def test_asking_the_lean_environment_for_a_gpu_says_what_to_install(installed, tmp_path):
    env, _, _ = installed
    embeddings = write_embeddings(tmp_path / "emb.tif", unit_embeddings(32, 32, seed=1))
    request = {"action": "predict", "params": {"embeddings": str(embeddings), "model": str(bundled_model_dir()),
                                               "out": str(tmp_path / "h.tif"), "device": "cuda"}}
    code, events, _ = _serve_in(env, tmp_path, request)
    error = next(e for e in events if e.get("event") == "error")
    assert code == 2 and error["kind"] == "input"
    assert "device 'cuda'" in error["message"] and "needs PyTorch" in error["message"]
    assert "Add training" in error["message"] and "\n" not in error["message"]
    assert not (tmp_path / "h.tif").exists()


def test_worker_python_needs_a_ready_environment_or_the_override(tmp_path, monkeypatch):
    env = ManagedEnvironment(tmp_path / "env")
    monkeypatch.delenv(PYTHON_OVERRIDE, raising=False)
    assert worker_python(env) is None
    monkeypatch.setenv(PYTHON_OVERRIDE, sys.executable)
    assert worker_python(env) == sys.executable


def test_remove_deletes_the_environment(tmp_path):
    env = ManagedEnvironment(tmp_path / "env", base_python=system_python())
    env.create(lambda line: None)
    assert env.python.is_file()
    env.remove()
    assert not env.folder.exists()


def test_a_failing_pip_is_one_line(tmp_path, monkeypatch):
    env = ManagedEnvironment(tmp_path / "env", base_python=system_python())
    monkeypatch.setattr(env, "requirements", lambda package_set: ["alphaearth-height-no-such-package==0.0.1"])
    with pytest.raises(SetupError) as info:
        env.install("inference", lambda line: None)
    assert "\n" not in str(info.value) and "no-such-package" in str(info.value).lower()
    assert not env.is_ready()


def test_plan_text_without_sizes():
    plan = InstallPlan([("onnxruntime", "1.32.0", 28_000_000), ("protobuf", "7.36.2", None)])
    assert plan.total_bytes is None and "size unknown" in plan.describe()


def test_a_set_installed_before_its_list_grew_is_offered_again(tmp_path):
    """An environment made by an older version (its marker lacks a requirement added since, such as the
    Earth Engine client) is not ready, so the dock shows Install, which adds what is new."""
    env = ManagedEnvironment(tmp_path / "env", base_python=system_python())
    env.python.parent.mkdir(parents=True)
    env.python.write_text("")  # stands for the interpreter: only its presence is checked here
    marker = env.folder / "alphaearth_height_ready.json"
    marker.write_text(json.dumps({"sets": ["inference"], "python": "/usr/bin/python3"}))  # the old marker
    assert not env.is_ready() and env.installed_sets() == []
    marker.write_text(json.dumps({"sets": ["inference"], "requirements": sorted(INFERENCE.values())}))
    assert env.is_ready() and env.installed_sets() == ["inference"]
    grown = sorted(set(INFERENCE.values()) - {INFERENCE["ee"]})
    marker.write_text(json.dumps({"sets": ["inference"], "requirements": grown}))
    assert not env.is_ready()
