"""The evaluation report, uncertainty by test-time augmentation and terrain-relative models."""

import json

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.windows import Window

from alphaearth_height.plugin.core.resample import ReferenceOnGrid
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.models import ModelPackage, architecture_config, load_model, make_card
from alphaearth_height.plugin.core.terrain import predict_surface
from alphaearth_height.plugin.core.uncertainty import predict_uncertainty
from alphaearth_height.training.evaluate import evaluate_model
from alphaearth_height.training.splits import SplitSpec
from alphaearth_height.training.train import TrainConfig, train_model
from conftest import coarse_terrain

# every plot of the report, with its size in pixels (figure size x 100 dpi)
EXPECTED_PLOTS = {"overall_scatter.png": (500, 450), "overall_histogram.png": (500, 400),
                  "test_scatter.png": (500, 450), "test_histogram.png": (500, 400),
                  "error_by_height.png": (640, 400), "maps.png": (1560, 500)}


@pytest.fixture(scope="module")
def report_dir(small_scene, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "evaluation"
    evaluate_model(tiny_model, small_scene.embeddings, small_scene.reference, out,
                   SplitSpec("blocks", block_size=64, buffer=4), device="cpu", uncertainty=True, log=lambda m: None)
    return out


def test_the_report_folder_holds_every_file_and_valid_pngs(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert names == {"report.json", "report.md", "prediction.tif", "difference.tif", "uncertainty.tif",
                     *EXPECTED_PLOTS}
    for name, size in EXPECTED_PLOTS.items():
        with Image.open(report_dir / name) as image:
            image.verify()
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and image.size == size, name
            assert np.asarray(image.convert("L")).std() > 5, name  # drawn, not blank


def test_the_report_has_model_and_ridge_per_area_and_height_bin(report_dir, small_scene):
    report = json.loads((report_dir / "report.json").read_text())
    assert report["split"]["kind"] == "blocks"
    for area in ("train", "validation", "test"):
        entry = report["areas"][area]
        assert entry["model"]["n"] == entry["ridge"]["n"] > 0
        assert sum(b["n"] for b in entry["model_bins"]) == entry["model"]["n"]
    pixels = report["split"]["pixels"]
    assert sum(report["areas"][a]["model"]["n"] for a in pixels) <= report["overall"]["n"]
    assert report["areas"]["train"]["ridge"]["r2"] > 0.3  # fitted where it is scored: it must fit
    markdown = (report_dir / "report.md").read_text()
    assert "| ridge test |" in markdown and "| model train |" in markdown and "![maps.png](maps.png)" in markdown


def test_uncertainty_is_on_the_prediction_grid_and_positive_somewhere(report_dir):
    with rasterio.open(report_dir / "uncertainty.tif") as spread, rasterio.open(report_dir / "prediction.tif") as pred:
        assert spread.transform == pred.transform and spread.shape == pred.shape
        values = spread.read(1, masked=True)
        assert values.min() >= 0 and values.max() > 0
        assert "augmentation" in spread.descriptions[0]


def test_a_per_pixel_model_has_zero_augmentation_spread(small_scene, tmp_path):
    """A 1x1 convolution commutes with flips and turns: any spread would mean a transform is not undone."""
    torch.manual_seed(0)
    config = architecture_config("unet", "resnet18", encoder_depth=3, decoder_channels=[16, 16, 8])
    card = make_card(config, name="per-pixel", target_mean=0.0, target_std=30.0, tile=64, overlap=16)
    package = ModelPackage(torch.nn.Conv2d(64, 1, 1), card, tmp_path)
    predict_uncertainty(small_scene.embeddings, package, tmp_path / "u.tif", device="cpu")
    with rasterio.open(tmp_path / "u.tif") as src:
        assert float(src.read(1, masked=True).max()) < 1e-3


def test_a_report_folder_is_never_overwritten(report_dir, small_scene, tiny_model):
    with pytest.raises(InputError, match="not empty"):
        evaluate_model(tiny_model, small_scene.embeddings, small_scene.reference, report_dir, device="cpu",
                       log=lambda m: None)


def test_a_terrain_relative_model_predicts_only_with_its_terrain(small_scene, tmp_path):
    terrain = coarse_terrain(small_scene, tmp_path / "terrain.tif")
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                         out=str(tmp_path / "run"), arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8],
                         patch_size=64, batch_size=4, epochs=1, steps_per_epoch=3, device="cpu", tile=64, overlap=16,
                         terrain=str(terrain))
    result = train_model(config, log=lambda m: None)
    package = load_model(result.model_dir)
    assert package.card["target"]["relative_to"]["file"] == "terrain.tif"
    assert abs(package.target_mean) < 30  # height above the coarse terrain, not absolute height
    with pytest.raises(InputError, match="coarse terrain raster"):
        predict_height(small_scene.embeddings, package, tmp_path / "h.tif", device="cpu")
    assert not (tmp_path / "h.tif").exists()
    predict_surface(small_scene.embeddings, package, tmp_path / "h.tif", terrain, device="cpu")
    predict_height(small_scene.embeddings, package, tmp_path / "relief.tif", device="cpu", relative=True)
    with rasterio.open(tmp_path / "h.tif") as h, rasterio.open(tmp_path / "relief.tif") as r:
        height, relief = h.read(1, masked=True), r.read(1, masked=True)
        with ReferenceOnGrid(terrain, small_scene.grid) as t:
            ground = t.read(Window(0, 0, small_scene.grid.width, small_scene.grid.height))
    both = ~height.mask & np.isfinite(ground)
    assert both.sum() > 1000
    assert np.allclose(height[both], relief[both] + ground[both], atol=1e-3)


def test_the_report_folder_and_files_honour_the_umask(report_dir):
    """mkdtemp's 0700 (and mkstemp's 0600) must not make a report private to its author."""
    import os
    import stat

    from alphaearth_height.plugin.core.rasters import current_umask

    mask = current_umask()
    assert stat.S_IMODE(os.stat(report_dir).st_mode) == 0o777 & ~mask
    for name in ("report.json", "prediction.tif", "difference.tif", "maps.png"):
        assert stat.S_IMODE(os.stat(report_dir / name).st_mode) == 0o666 & ~mask, name
