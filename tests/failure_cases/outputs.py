"""Faults writing outputs: collisions, full disks, read-only folders, interruptions."""

from __future__ import annotations

from . import Case


def _out_is_a_directory(ws):
    (ws.out / "h.tif").mkdir(parents=True)
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.model, "--out", ws.out / "h.tif"]


CASES = [
    Case("predict: --out is a directory", _out_is_a_directory, lambda ws: [str(ws.out / "h.tif"), "directory"]),
]
