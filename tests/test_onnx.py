"""The ONNX backend: graphs that share the safetensors weights, agreement with torch, choice of backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import make_runner, predict_height, resolve_backend
from alphaearth_height.plugin.core.models import (ONNX_FILE, WEIGHTS_FILE, bundled_model_dir, export_onnx,
                                                  open_package)

from conftest import unit_embeddings, write_embeddings


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    values = unit_embeddings(160, 200, seed=11)
    values[:, 40:50, 60:90] = np.nan
    return write_embeddings(tmp_path_factory.mktemp("onnx") / "emb.tif", values)


def test_bundled_model_ships_a_graph_that_shares_its_weights():
    package = open_package(bundled_model_dir())
    graph = package.onnx_path
    assert graph is not None and package.module is None  # opened without torch
    weights = package.path / WEIGHTS_FILE
    assert graph.stat().st_size < 0.01 * weights.stat().st_size  # no second copy of the weights
    assert package.card["onnx"]["file"] == ONNX_FILE


@pytest.mark.parametrize("model", ["bundled", "tiny"])
def test_onnx_and_torch_agree(model, embeddings, tiny_model, tmp_path):
    folder = bundled_model_dir() if model == "bundled" else tiny_model
    heights = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / f"{backend}.tif"
        result = predict_height(embeddings, folder, out, backend=backend, device="cpu")
        assert ("ONNX Runtime" in result.device) == (backend == "onnx")
        with rasterio.open(out) as src:
            heights[backend] = src.read(1)
            nodata = src.nodata
    valid = heights["torch"] != nodata
    assert np.array_equal(valid, heights["onnx"] != nodata)
    assert valid.sum() > 0.9 * valid.size
    assert np.abs(heights["onnx"][valid] - heights["torch"][valid]).max() <= 0.05


def test_export_adds_a_graph_to_an_existing_package(tiny_model, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model, folder)
    (folder / ONNX_FILE).unlink()
    card = json.loads((folder / "model.json").read_text())
    card.pop("onnx")
    (folder / "model.json").write_text(json.dumps(card))
    assert open_package(folder).onnx_path is None
    export_onnx(folder)
    package = open_package(folder)
    assert package.onnx_path is not None and package.card["onnx"]["sha256"]
    runner = make_runner(package, "onnx", "cpu")
    batch = np.zeros((2, 64, 64, 64), dtype=np.float32)
    assert runner(batch).shape == (2, 64, 64)


def test_a_replaced_graph_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "tampered"
    shutil.copytree(tiny_model, folder)
    with open(folder / ONNX_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="does not match the hash"):
        open_package(folder)


def test_backend_choice(tiny_model, tmp_path):
    package = open_package(tiny_model)
    assert resolve_backend(package, "auto", "cpu") == "onnx"
    assert resolve_backend(package, "torch", "cpu") == "torch"
    assert resolve_backend(package, "auto", "cuda") == "torch"  # GPUs run on torch
    with pytest.raises(InputError, match="CPU only"):
        resolve_backend(package, "onnx", "cuda")
    with pytest.raises(InputError, match="backend 'tensorrt': is not known"):
        resolve_backend(package, "tensorrt", "cpu")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / ONNX_FILE).unlink()
    assert resolve_backend(open_package(bare), "auto", "cpu") == "torch"
    with pytest.raises(InputError, match="export-onnx"):
        resolve_backend(open_package(bare), "onnx", "cpu")
