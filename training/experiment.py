"""The paper's experiment on the synthetic demo scene: U-Net vs U-Net++ vs per-pixel ridge,
trained on the western 60 % (plus a 10 % validation strip) and tested on the higher
eastern 30 %, i.e. under the same kind of distribution shift as the paper's split.

Beyond the paper, with a coarse terrain input: the scene gains synthetic stand-ins for the
Copernicus DEM (core.demo_scene.write_coarse_dems: its reference DSM averaged onto 1" and
3" pixels, plus noise), a U-Net++ is trained on height above the 30 m one, and the
coarse DEMs alone are scored like predictions ("terrain alone"): the baseline any model
given a free global DEM has to beat.

The default budget (small encoder, 128 px patches, few steps) trains three nets: the two of
the paper took about 8 minutes on 2 idle CPU cores, and the terrain-relative U-Net++ costs
about as much as the other U-Net++. Each net's uncertainty is calibrated on its validation
strip (core.uncertainty spread x k, training.calibration) and the table's test_coverage_90
is how often that nominal 90 % interval holds the reference on the test area. The numbers it
writes are the only ones the README quotes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rasterio.windows import Window

from ..plugin.core.resample import ReferenceOnGrid
from ..plugin.core.demo_scene import generate_demo_scene, write_coarse_dems
from ..plugin.core.errors import InputError
from ..plugin.core.metrics import binned_metrics, format_markdown_table, height_metrics, json_safe, nice_bin_edges
from ..plugin.core.plots import render_error_by_bin
from .data import load_pair
from .splits import SplitSpec, make_areas
from .train import TrainConfig, train_model

# label -> (architecture, run folder, coarse DEM it is trained relative to or None)
MODELS = {"U-Net": ("unet", "unet", None), "U-Net++": ("unetplusplus", "unetplusplus", None),
          "U-Net++ + coarse DEM 30 m": ("unetplusplus", "unetplusplus_dem30", "30m")}
RIDGE, TERRAIN_ROWS = "ridge (per pixel)", {"30m": "terrain alone (coarse DEM 30 m)",
                                             "90m": "terrain alone (coarse DEM 90 m)"}
COLUMNS = ("train_r2", "test_r2", "train_rmse", "test_rmse", "train_median_diff", "test_median_diff",
           "test_coverage_90")


@dataclass
class ExperimentBudget:
    scene_size: int = 1024
    encoder_depth: int = 4
    decoder_channels: tuple[int, ...] = (96, 48, 24, 16)
    patch_size: int = 128
    batch_size: int = 8
    epochs: int = 6
    steps_per_epoch: int = 25
    seed: int = 0


def run_experiment(out_dir: str | os.PathLike, budget: ExperimentBudget = ExperimentBudget(), device: str = "cpu",
                   log: Callable[[str], None] = print) -> dict:
    """Train both nets on the same split, then tabulate them with the ridge baseline."""
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "already exists and is not empty", "Choose a new folder for the experiment")
    scene = generate_demo_scene(out / "scene", width=budget.scene_size, height=budget.scene_size)
    dems = write_coarse_dems(scene, out / "scene")
    reports = {}
    for label, (arch, folder, dem) in MODELS.items():
        log(f"--- {label}")
        config = TrainConfig(
            embeddings=str(scene.embeddings), reference=str(scene.reference), out=str(out / folder), arch=arch,
            terrain=str(dems[dem]) if dem else None, calibrate=True,
            encoder_depth=budget.encoder_depth, decoder_channels=list(budget.decoder_channels),
            patch_size=budget.patch_size, batch_size=budget.batch_size, epochs=budget.epochs,
            steps_per_epoch=budget.steps_per_epoch, patience=budget.epochs, seed=budget.seed, device=device,
            split=SplitSpec(seed=budget.seed),
            name=f"{label} (ResNet-18) - experiment", region="synthetic demo scene (not real data)", year=2020)
        train_model(config, log=log)
        reports[label] = json.loads((out / folder / "evaluation" / "report.json").read_text())
    terrain = terrain_alone(scene, dems, reports["U-Net"]["split"])
    result = _tabulate(reports, terrain, time.perf_counter() - started, budget, device)
    _write(out, result, reports, terrain)
    log(f"comparison written to {out}/comparison.md ({result['seconds'] / 60:.1f} min)")
    return result


def _row(areas: dict, who: str) -> dict:
    return {f"{name}_{key}": areas[name][who][key] for name in ("train", "test") for key in ("r2", "rmse",
                                                                                            "median_diff")}


def _coverage(report: dict) -> float:
    """Share of the test area inside the net's calibrated 90 % interval (k from its validation area)."""
    return report.get("uncertainty_interval", {}).get("coverage", {}).get("test", float("nan"))


def terrain_alone(scene, dems: dict, split: dict) -> dict:
    """Each coarse DEM scored as a prediction on the runs' split (valid embeddings and reference, as the nets)."""
    pair = load_pair(scene.embeddings, scene.reference)
    spec = SplitSpec.from_dict({k: v for k, v in split.items() if k != "pixels"})
    areas = make_areas(spec, pair.grid.height, pair.grid.width)
    valid = pair.label_mask
    edges = nice_bin_edges(pair.reference[valid])
    whole = Window(0, 0, pair.grid.width, pair.grid.height)
    result = {}
    for key, path in dems.items():
        with ReferenceOnGrid(path, pair.grid) as dem:
            ground = dem.read(whole)
        result[key] = {name: {"terrain": height_metrics(ground[mask], pair.reference[mask]),
                              "terrain_bins": binned_metrics(ground[mask], pair.reference[mask], edges)}
                       for name, mask in (("train", areas.train & valid), ("test", areas.test & valid))}
    return result


def _tabulate(reports: dict, terrain: dict, seconds: float, budget: ExperimentBudget, device: str) -> dict:
    rows = {label: {**_row(report["areas"], "model"), "test_coverage_90": _coverage(report)}
            for label, report in reports.items()}
    rows[RIDGE] = _row(reports["U-Net"]["areas"], "ridge")  # the same split for every run
    for key, label in TERRAIN_ROWS.items():
        rows[label] = _row(terrain[key], "terrain")
    return {"rows": rows, "seconds": seconds, "budget": budget.__dict__, "device": device,
            "date": time.strftime("%Y-%m-%d"), "split": reports["U-Net"]["split"],
            "coarse_dems": "synthetic: the reference DSM averaged onto 1\" / 3\" pixels in EPSG:4326, plus 2 m noise"}


def _write(out: Path, result: dict, reports: dict, terrain: dict) -> None:
    (out / "comparison.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
    table = format_markdown_table(result["rows"], COLUMNS)
    (out / "comparison.md").write_text(table + "\n")
    series = {f"{label} test": r["areas"]["test"]["model_bins"] for label, r in reports.items()}
    series["ridge test"] = reports["U-Net"]["areas"]["test"]["ridge_bins"]
    series[f"{TERRAIN_ROWS['30m']} test"] = terrain["30m"]["test"]["terrain_bins"]
    render_error_by_bin(series, out / "error_by_height.png", title="Test area: error by reference height")
