"""The demo end to end with the bundled model: what `make demo` promises."""

import json

import numpy as np
import rasterio
from PIL import Image

from alphaearth_height.training.demo import run_demo


def test_demo_writes_every_output_and_the_net_beats_ridge(tmp_path):
    result = run_demo(tmp_path, device="cpu", log=lambda message: None)
    for name in ("embeddings.tif", "reference_dsm.tif", "predicted_height.tif", "difference.tif",
                 "metrics.json", "height_maps.png"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["embeddings"] == str(tmp_path / "embeddings.tif")  # written in a staging folder, renamed
    assert not [p for p in tmp_path.parent.iterdir() if ".partial" in p.name]
    test = metrics["areas"]["test"]
    assert test["model"]["r2"] >= test["ridge"]["r2"] + 0.2
    assert metrics["areas"]["train"]["model"]["r2"] > test["model"]["r2"]  # the paper's train/test gap
    assert metrics["overall_bins"] and "height_maps.png" in metrics["plots"]
    assert "unetplusplus test" in result.table and "ridge test" in result.table
    assert "![height_maps.png](height_maps.png)" in (tmp_path / "report.md").read_text()
    with rasterio.open(tmp_path / "predicted_height.tif") as pred, rasterio.open(tmp_path / "embeddings.tif") as emb:
        assert pred.crs == emb.crs and pred.transform == emb.transform and pred.shape == emb.shape
    image = np.asarray(Image.open(tmp_path / "height_maps.png").convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 900
    assert image.std() > 20  # a picture, not a blank canvas
