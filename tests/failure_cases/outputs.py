"""Faults writing outputs: collisions, full disks, read-only folders, interruptions.

Disk-full cases mount a 1 MiB tmpfs on ws.out (``Workspace.small_disk``), put an earlier
valid output at the target and fill the rest so that the write fails part-way; the
runner then checks that earlier output is byte-identical. Without mounts (not root)
a file size limit stands in for the full disk, and free-space checks are skipped.
"""

from __future__ import annotations

import json

import numpy as np
import rasterio
from affine import Affine

from conftest import UTM

from . import Case

KIB = 1024


def _full(ws) -> str:
    """What a full disk is called: the real thing, or the file size limit standing in for it."""
    return "the disk is full" if ws.mounted else "largest size"


# ---- helpers ------------------------------------------------------------------------------------

def _small_raster(path, size: int = 64) -> "Path":  # noqa: F821 - pathlib.Path
    """A small valid height GeoTIFF (an earlier run's output, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    heights = np.linspace(0, 50, size * size, dtype=np.float32).reshape(size, size)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32", crs=UTM,
                       transform=Affine(10, 0, 690_000, 0, -10, 4_975_000), nodata=-9999) as dst:
        dst.write(heights, 1)
    return path


def _earlier(ws, name: str):
    """A valid earlier output at ws.out/name (a small raster, or JSON for .json)."""
    if name.endswith(".json"):
        source = ws.inputs / "earlier.json"
        source.write_text(json.dumps({"overall": {"rmse": 1.0}}) + "\n")
    else:
        source = _small_raster(ws.inputs / "earlier.tif")
    return ws.earlier_output(name, source)


def _prediction(ws):
    """A real prediction of the scene (the input of compare and correct), in ws.inputs."""
    path = ws.inputs / "predicted.tif"
    if not path.exists():
        from alphaearth_height.plugin.core.inference import predict_height

        predict_height(ws.scene.embeddings, ws.model, path, device="cpu")
    return path


def _points(ws):
    """Reference heights at 12 pixel centres of the prediction (x,y in its CRS)."""
    path = ws.inputs / "points.csv"
    with rasterio.open(_prediction(ws)) as src:
        lines = ["x,y,height"]
        for i in range(12):
            col, row = 20 + 17 * i, 30 + 15 * i
            x, y = src.xy(row, col)
            lines.append(f"{x},{y},{100 + i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _predict(ws, out, *extra):
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.model, "--out", out, *extra]


def _processing_predict(out_fn):
    return lambda ws: ("predictheight", {"INPUT": str(ws.scene.embeddings), "MODEL": str(ws.model),
                                         "OUTPUT": str(out_fn(ws))})


# ---- outputs that collide with each other, with inputs, or are of the wrong kind ----------------

def _out_is_a_directory(ws):
    (ws.out / "h.tif").mkdir(parents=True)
    return _predict(ws, ws.out / "h.tif")


def _uncertainty_is_out(ws):
    return _predict(ws, ws.out / "h.tif", "--uncertainty", ws.out / "h.tif")


def _predict_out_is_embeddings(ws):
    embeddings = ws.earlier_output("emb.tif", ws.scene.embeddings)
    return ["predict", "--embeddings", embeddings, "--model", ws.model, "--out", embeddings]


def _compare_same_outputs(ws):
    return ["compare", "--predicted", _prediction(ws), "--reference", ws.scene.reference,
            "--out", ws.out / "d.tif", "--metrics", ws.out / "d.tif"]


def _compare_metrics_is_a_directory(ws):
    (ws.out / "m.json").mkdir()
    return ["compare", "--predicted", _prediction(ws), "--reference", ws.scene.reference,
            "--metrics", ws.out / "m.json"]


def _correct_out_is_predicted(ws):
    predicted = ws.earlier_output("p.tif", _prediction(ws))
    return ["correct", "--predicted", predicted, "--points", _points(ws), "--out", predicted]


def _fetch_out_is_local_raster(ws):
    raster = ws.earlier_output("emb.tif", ws.scene.embeddings)
    return ["fetch", "--source", "local", "--local-raster", raster, "--aoi", "690500", "4972500", "691500",
            "4973500", "--aoi-crs", UTM, "--year", "2020", "--out", raster]


def _evaluate_out_is_a_file(ws):
    report = _earlier(ws, "report")
    return ["evaluate", "--model", ws.model, "--embeddings", ws.scene.embeddings, "--reference",
            ws.scene.reference, "--out", report]


def _train_out_is_a_file(ws):
    run = _earlier(ws, "run")
    return ["train", "--embeddings", ws.scene.embeddings, "--reference", ws.scene.reference, "--out", run,
            "--epochs", "1", "--steps-per-epoch", "1"]


def _demo_folder_not_empty(ws):
    _earlier(ws, "demo/embeddings.tif")
    return ["demo", "--out", ws.out / "demo", "--model", ws.model]


def _demo_scene_folder_not_empty(ws):
    _earlier(ws, "scene/embeddings.tif")
    return ["demo", "--scene-only", "--out", ws.out / "scene"]


def _demo_bad_model(ws):
    return ["demo", "--out", ws.out / "demo", "--model", ws.inputs / "nope"]


# ---- a full disk: the earlier output at the target must survive ---------------------------------

def _predict_disk_full(ws):
    """Free space above predict's estimate (64 kB for 256 x 256 px) but below the 170 kB it writes."""
    ws.small_disk()
    _earlier(ws, "h.tif")
    ws.fill_disk(leave=100 * KIB)
    return _predict(ws, ws.out / "h.tif")


def _predict_not_enough_space(ws):
    ws.require_small_disk()
    _earlier(ws, "h.tif")
    ws.fill_disk(leave=24 * KIB)
    return _predict(ws, ws.out / "h.tif")


def _compare_disk_full(ws):
    predicted = _prediction(ws)
    ws.small_disk()
    _earlier(ws, "d.tif")
    ws.fill_disk(leave=40 * KIB)
    return ["compare", "--predicted", predicted, "--reference", ws.scene.reference, "--out", ws.out / "d.tif"]


def _compare_metrics_disk_full(ws):
    predicted = _prediction(ws)
    ws.small_disk()
    _earlier(ws, "m.json")
    ws.fill_disk(leave=0)
    return ["compare", "--predicted", predicted, "--reference", ws.scene.reference, "--metrics", ws.out / "m.json"]


def _correct_disk_full(ws):
    predicted, points = _prediction(ws), _points(ws)
    ws.small_disk()
    _earlier(ws, "c.tif")
    ws.fill_disk(leave=40 * KIB)
    return ["correct", "--predicted", predicted, "--points", points, "--out", ws.out / "c.tif"]


def _demo_not_enough_space(ws):
    ws.require_small_disk()
    return ["demo", "--out", ws.out / "demo", "--model", ws.model]


# ---- read-only output folder --------------------------------------------------------------------

def _predict_read_only(ws):
    ws.small_disk()
    _earlier(ws, "h.tif")
    ws.read_only_out()
    return _predict(ws, ws.out / "h.tif")


# ---- resuming from a damaged checkpoint ---------------------------------------------------------

def _resume_truncated_checkpoint(ws):
    """A run folder as an interrupted train leaves it, but the tensors cut short (a save on a full disk)."""
    from alphaearth_height.training.train import TrainConfig
    from dataclasses import asdict

    run = ws.out / "run"
    (run / "checkpoint").mkdir(parents=True)
    config = TrainConfig(embeddings=str(ws.scene.embeddings), reference=str(ws.scene.reference), out=str(run),
                         arch="unet", encoder_depth=3, decoder_channels=[32, 16, 8], patch_size=64,
                         batch_size=2, epochs=2, steps_per_epoch=1, device="cpu")
    (run / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (run / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 1, "history": []}) + "\n")
    weights = (ws.model / "model.safetensors").read_bytes()
    (run / "checkpoint" / "state.safetensors").write_bytes(weights[: len(weights) // 2])
    return ["train", "--resume", run]


CASES = [
    Case("predict: --out is a directory", _out_is_a_directory, lambda ws: [str(ws.out / "h.tif"), "directory"],
         processing=_processing_predict(lambda ws: ws.out / "h.tif")),
    Case("predict: --uncertainty is --out", _uncertainty_is_out, ("--out", "--uncertainty", "both")),
    Case("predict: --out is the --embeddings", _predict_out_is_embeddings, ("emb.tif", "--embeddings")),
    Case("predict: disk full while writing", _predict_disk_full,
         lambda ws: [str(ws.out / "h.tif"), _full(ws)],
         processing=_processing_predict(lambda ws: ws.out / "h.tif")),
    Case("predict: not enough free space", _predict_not_enough_space,
         lambda ws: [str(ws.out / "h.tif"), "the prediction needs about", "free"],
         processing=_processing_predict(lambda ws: ws.out / "h.tif")),
    Case("predict: read-only output folder", _predict_read_only, lambda ws: [str(ws.out / "h.tif"), "read-only"],
         processing=_processing_predict(lambda ws: ws.out / "h.tif")),
    Case("compare: --out and --metrics are one file", _compare_same_outputs,
         lambda ws: [str(ws.out / "d.tif"), "both"],
         processing=lambda ws: ("compareheights", {"PREDICTED": str(_prediction(ws)),
                                                   "REFERENCE": str(ws.scene.reference),
                                                   "OUTPUT": str(ws.out / "d.tif"), "METRICS": str(ws.out / "d.tif")})),
    Case("compare: --metrics is a directory", _compare_metrics_is_a_directory, ("m.json", "directory")),
    Case("compare: disk full while writing the difference", _compare_disk_full,
         lambda ws: [str(ws.out / "d.tif"), _full(ws)],
         processing=lambda ws: ("compareheights", {"PREDICTED": str(_prediction(ws)),
                                                   "REFERENCE": str(ws.scene.reference),
                                                   "OUTPUT": str(ws.out / "d.tif"),
                                                   "METRICS": str(ws.inputs / "m.json")})),
    Case("compare: disk full while writing the metrics", _compare_metrics_disk_full,
         lambda ws: [str(ws.out / "m.json"), _full(ws)]),
    Case("correct: --out is --predicted", _correct_out_is_predicted, ("p.tif", "--predicted")),
    Case("correct: disk full while writing", _correct_disk_full,
         lambda ws: [str(ws.out / "c.tif"), _full(ws)]),
    Case("fetch: --out is the --local-raster", _fetch_out_is_local_raster, ("emb.tif", "--local-raster")),
    Case("evaluate: --out is an existing file", _evaluate_out_is_a_file,
         lambda ws: [str(ws.out / "report"), "existing file"]),
    Case("train: --out is an existing file", _train_out_is_a_file, lambda ws: [str(ws.out / "run"), "existing file"]),
    Case("train: --resume from a truncated checkpoint", _resume_truncated_checkpoint,
         ("state.safetensors", "truncated")),
    Case("demo: --out is not empty", _demo_folder_not_empty, lambda ws: [str(ws.out / "demo"), "not empty"]),
    Case("demo: --scene-only --out is not empty", _demo_scene_folder_not_empty,
         lambda ws: [str(ws.out / "scene"), "not empty"]),
    Case("demo: bad --model writes nothing", _demo_bad_model, ("nope",)),
    Case("demo: not enough free space", _demo_not_enough_space,
         lambda ws: [str(ws.out / "demo"), "the demo needs about", "free"]),
]
