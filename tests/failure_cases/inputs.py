"""Bad inputs: rasters, model folders and cards, options."""

from __future__ import annotations

from conftest import unit_embeddings, write_embeddings

from . import Case


def _three_band(ws):
    bad = write_embeddings(ws.inputs / "three.tif", unit_embeddings(16, 16)[:3], quantised=False)
    return ["predict", "--embeddings", bad, "--model", ws.model, "--out", ws.out / "h.tif"]


def _pickled_model(ws):
    folder = ws.inputs / "pickled"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", folder / "model.pt", "--out", ws.out / "h.tif"]


def _missing_model(ws):
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.inputs / "nope", "--out", ws.out / "h.tif"]


def _bad_tile(ws):
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.model, "--out", ws.out / "h.tif",
            "--tile", "100"]


CASES = [
    Case("predict: 3-band embeddings", _three_band, lambda ws: [str(ws.inputs / "three.tif"), "64"],
         processing=lambda ws: ("predictheight", {"INPUT": str(ws.inputs / "three.tif"), "MODEL": str(ws.model),
                                                  "OUTPUT": str(ws.out / "h.tif")})),
    Case("predict: pickled checkpoint", _pickled_model, ("model.pt", "pickle", "safetensors")),
    Case("predict: missing model folder", _missing_model, ("nope", "not a model folder"),
         processing=lambda ws: ("predictheight", {"INPUT": str(ws.scene.embeddings), "MODEL": str(ws.inputs / "nope"),
                                                  "OUTPUT": str(ws.out / "h.tif")})),
    Case("predict: tile not a multiple of the model's", _bad_tile, ("tile size 100", "multiple")),
]
