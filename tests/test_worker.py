"""The worker process: real subprocesses running core, progress as JSON lines, cancel, crashes."""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest
import rasterio

from alphaearth_height.plugin.core.cancel import Cancelled
from alphaearth_height.plugin.core.worker import WorkerError, WorkerInputError, call_worker

from conftest import unit_embeddings, write_embeddings

PYTHON = sys.executable


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("worker") / "emb.tif", unit_embeddings(192, 192, seed=5))


def test_predict_in_a_worker_reports_progress_and_a_result(embeddings, tiny_model, tmp_path):
    out = tmp_path / "h.tif"
    progress, logs = [], []
    result = call_worker("predict", {"embeddings": str(embeddings), "model": str(tiny_model), "out": str(out),
                                     "device": "cpu", "tile": 64, "overlap": 16},
                         python=PYTHON, progress=progress.append, on_log=lambda level, msg: logs.append(msg))
    assert result["path"] == str(out) and result["width"] == 192 and result["tiles"] > 4
    assert "ONNX Runtime" in result["device"]
    assert progress and progress[-1] == 100.0 and progress == sorted(progress)
    with rasterio.open(out) as src:
        assert src.crs.to_string() == "EPSG:32630" and src.transform.e < 0


def test_the_worker_never_imports_torch_for_onnx_inference(embeddings, tiny_model, tmp_path):
    """The lean environment has no torch: an ONNX run must not need it."""
    result = call_worker("environment", {"probe_gpu": False}, python=PYTHON)
    assert result["packages"]["onnxruntime"] and result["onnxruntime"]
    code = ("import sys, json; from alphaearth_height.plugin.core.terrain import predict_surface; "
            f"predict_surface({str(embeddings)!r}, {str(tiny_model)!r}, {str(tmp_path / 'h.tif')!r}, device='cpu'); "
            "print(json.dumps('torch' in sys.modules))")
    assert os.popen(f"{PYTHON} -c \"{code}\"").read().strip() == "false"


def test_bad_input_comes_back_as_one_line(tiny_model, tmp_path):
    with pytest.raises(WorkerInputError) as info:
        call_worker("predict", {"embeddings": str(tmp_path / "missing.tif"), "model": str(tiny_model),
                                "out": str(tmp_path / "h.tif")}, python=PYTHON)
    message = str(info.value)
    assert "missing.tif" in message and "\n" not in message
    assert not (tmp_path / "h.tif").exists()


def test_unknown_action_is_refused(tmp_path):
    with pytest.raises(WorkerInputError, match="is unknown"):
        call_worker("format_disk", {}, python=PYTHON)


def test_cancel_terminates_the_worker_and_leaves_nothing(tmp_path, tiny_model):
    big = write_embeddings(tmp_path / "big.tif", unit_embeddings(640, 640, seed=2))
    out = tmp_path / "out" / "h.tif"
    out.parent.mkdir()
    seen = []
    started = time.monotonic()
    with pytest.raises(Cancelled):
        call_worker("predict", {"embeddings": str(big), "model": str(tiny_model), "out": str(out),
                                "device": "cpu", "tile": 64, "overlap": 16, "batch_size": 1},
                    python=PYTHON, progress=seen.append, cancel=lambda: bool(seen))
    assert time.monotonic() - started < 60
    assert seen and seen[-1] < 100
    assert list(out.parent.iterdir()) == []  # no output, no hidden partial


def test_a_crashing_worker_is_an_error_not_a_crash(tmp_path):
    segfaulting = tmp_path / "python"
    segfaulting.write_text("#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n")
    segfaulting.chmod(segfaulting.stat().st_mode | stat.S_IEXEC)
    logs = []
    with pytest.raises(WorkerError, match="crashed: killed by SIGSEGV") as info:
        call_worker("environment", {}, python=str(segfaulting), on_log=lambda level, msg: logs.append(msg))
    assert "about to crash" in info.value.details and "about to crash" in logs


def test_a_missing_interpreter_is_one_clear_error(tmp_path):
    with pytest.raises(WorkerError, match="cannot be started"):
        call_worker("environment", {}, python=str(tmp_path / "no-python"))
