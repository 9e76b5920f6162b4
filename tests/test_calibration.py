"""Calibrated uncertainty: prediction ± k x TTA spread as a 90 % interval, k from the validation area."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.models import load_model
from alphaearth_height.plugin.core.uncertainty import predict_uncertainty
from alphaearth_height.training.calibration import LEVEL, coverage, scale_for
from alphaearth_height.training.evaluate import evaluate_model
from alphaearth_height.training.train import TrainConfig, train_model


def test_scale_and_coverage():
    rng = np.random.default_rng(0)
    spread = rng.uniform(1.0, 10.0, 200_000)
    errors = spread * rng.standard_normal(spread.size)  # errors that the spread describes exactly
    k = scale_for(errors, spread)
    assert k == pytest.approx(1.645, abs=0.02)  # the 90 % two-sided quantile of a normal
    assert coverage(errors, spread, k) == pytest.approx(LEVEL, abs=1e-3)
    assert coverage(errors, spread, 2 * k) > 0.99 and coverage(errors, spread, k / 2) < 0.6
    # a zero spread needs no infinite scale; NaNs are left out
    assert np.isfinite(scale_for(np.array([1.0, 2.0, np.nan]), np.array([0.0, 1.0, 1.0])))


@pytest.fixture(scope="module")
def calibrated_run(small_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "run"
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference), out=str(out),
                         arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8], patch_size=64, batch_size=4,
                         epochs=1, steps_per_epoch=3, device="cpu", tile=64, overlap=16)
    train_model(config, log=lambda m: None)
    return out


def test_training_records_the_scale_in_the_card(calibrated_run):
    card = json.loads((calibrated_run / "model.json").read_text())
    entry = card["uncertainty"]
    assert entry["calibrated_on"] == "validation area" and entry["level"] == LEVEL
    assert entry["k"] > 0 and entry["pixels"] > 1000
    assert entry["validation_coverage"] == pytest.approx(LEVEL, abs=0.005)
    assert not list(calibrated_run.glob(".calibration*"))  # its scratch folder is gone


def test_evaluate_reports_coverage_with_the_cards_scale(calibrated_run, small_scene, tmp_path):
    """The card's k was found on the validation area from a crop of the scene; the report's spread covers
    the whole scene. Both must put about 90 % of the validation pixels inside (a misplaced crop would not)."""
    report = evaluate_model(calibrated_run, small_scene.embeddings, small_scene.reference, tmp_path / "report",
                            device="cpu", uncertainty=True, log=lambda m: None)
    interval = report["uncertainty_interval"]
    card = load_model(calibrated_run).card
    assert interval["k"] == pytest.approx(card["uncertainty"]["k"]) and interval["k_from"].startswith("model card")
    assert interval["coverage"]["validation"] == pytest.approx(LEVEL, abs=0.03)
    assert set(interval["coverage"]) == {"train", "validation", "test"}
    assert all(width > 0 for width in interval["median_half_width_m"].values())
    assert "## Uncertainty: prediction ±" in (tmp_path / "report" / "report.md").read_text()
    # the spread raster says how to turn it into the interval
    with rasterio.open(tmp_path / "report" / "uncertainty.tif") as ds:
        assert float(ds.tags(1)["INTERVAL_90_SCALE"]) == pytest.approx(card["uncertainty"]["k"], rel=1e-4)


def test_without_a_card_scale_the_report_calibrates_on_its_validation_area(tiny_model, small_scene, tmp_path):
    report = evaluate_model(tiny_model, small_scene.embeddings, small_scene.reference, tmp_path / "r", device="cpu",
                            uncertainty=True, log=lambda m: None)
    interval = report["uncertainty_interval"]
    assert interval["k_from"].startswith("this report's validation area")
    assert interval["coverage"]["validation"] == pytest.approx(LEVEL, abs=0.005)
    predict_uncertainty(small_scene.embeddings, tiny_model, tmp_path / "u.tif", device="cpu", batch_size=2)
    with rasterio.open(tmp_path / "u.tif") as ds:
        assert "INTERVAL_90_SCALE" not in ds.tags(1)


def test_training_without_calibration(small_scene, tmp_path):
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                         out=str(tmp_path / "run"), arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8],
                         patch_size=64, batch_size=2, epochs=1, steps_per_epoch=1, device="cpu", tile=64, overlap=16,
                         calibrate=False)
    train_model(config, log=lambda m: None)
    assert "uncertainty" not in json.loads((tmp_path / "run" / "model.json").read_text())


def test_calibrate_command_adds_the_scale_to_an_older_card(calibrated_run, small_scene, tmp_path):
    """An older model folder (no ``uncertainty`` in its card) gets the same k its training run would record."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "older"
    shutil.copytree(calibrated_run, folder)
    card = json.loads((folder / "model.json").read_text())
    trained = card.pop("uncertainty")
    (folder / "model.json").write_text(json.dumps(card))
    cli = Path(sys.executable).parent / "alphaearth-height"
    result = subprocess.run([str(cli), "calibrate", "--model", str(folder), "--embeddings", str(small_scene.embeddings),
                             "--reference", str(small_scene.reference), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "90% interval on the validation area" in result.stdout
    added = json.loads((folder / "model.json").read_text())["uncertainty"]
    assert added["k"] == pytest.approx(trained["k"], rel=1e-6) and added["pixels"] == trained["pixels"]
    assert added["calibrated_with"] == {"embeddings": "embeddings.tif", "reference": "reference_dsm.tif"}
    load_model(folder)  # the rewritten card still validates against the weights
