"""Training a height model on an aligned embeddings + reference pair (the paper's recipe:
U-Net/U-Net++, masked MSE, AdamW lr 1e-3 wd 1e-4, early stopping on validation)."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from rasterio.windows import Window

from ..plugin.core.compare import compare_heights
from ..plugin.core.device import describe_device, select_device
from ..plugin.core.errors import InputError
from ..plugin.core.inference import predict_height
from ..plugin.core.models import (ModelPackage, architecture_config, build_model, make_card, save_model,
                                  size_multiple)
from .data import AlignedPair, Split, contiguous_split, load_pair, window_union

LOSSES = ("mse", "huber")
Log = Callable[[str], None]


@dataclass
class TrainConfig:
    embeddings: str
    reference: str
    out: str
    arch: str = "unetplusplus"
    encoder: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: Optional[list[int]] = None
    patch_size: int = 256
    batch_size: int = 8
    epochs: int = 30
    steps_per_epoch: int = 50
    patience: int = 6
    loss: str = "mse"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.3
    validation_fraction: float = 0.1
    direction: str = "east"
    seed: int = 0
    device: str = "auto"
    name: str = ""
    region: str = ""
    year: Optional[int] = None
    tile: int = 256
    overlap: int = 64


@dataclass
class TrainResult:
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _check(config: TrainConfig, multiple: int) -> None:
    if config.loss not in LOSSES:
        raise InputError(f"loss '{config.loss}'", "is not known", f"Use one of: {', '.join(LOSSES)}")
    if config.patch_size % multiple:
        raise InputError(f"patch size {config.patch_size}", f"is not a multiple of {multiple}, which this "
                         "architecture needs", f"Use e.g. {max(multiple, config.patch_size // multiple * multiple)}")
    for name in ("batch_size", "epochs", "steps_per_epoch"):
        if getattr(config, name) < 1:
            raise InputError(f"{name.replace('_', ' ')} {getattr(config, name)}", "must be at least 1",
                             "Give a positive number")


class _Patches:
    """Random patches inside a window, keeping only those with enough labelled pixels."""

    def __init__(self, pair: AlignedPair, window: Window, size: int, rng: np.random.Generator) -> None:
        if window.width < size or window.height < size:
            raise InputError(f"patch size {size}", f"does not fit the {int(window.width)}x{int(window.height)} px "
                             "training strip", "Use a smaller --patch-size or a larger area")
        self.pair, self.window, self.size, self.rng = pair, window, size, rng
        self.mask = pair.label_mask

    def origin(self) -> tuple[int, int]:
        for _ in range(50):
            r = int(self.window.row_off + self.rng.integers(0, self.window.height - self.size + 1))
            c = int(self.window.col_off + self.rng.integers(0, self.window.width - self.size + 1))
            if self.mask[r:r + self.size, c:c + self.size].mean() > 0.5:
                return r, c
        return r, c

    def grid_origins(self) -> list[tuple[int, int]]:
        """Non-overlapping patches tiling the window (for a fixed validation set)."""
        w, s = self.window, self.size
        return [(int(r), int(c)) for r in range(w.row_off, w.row_off + w.height - s + 1, s)
                for c in range(w.col_off, w.col_off + w.width - s + 1, s)]


def _batch(pair: AlignedPair, mask: np.ndarray, origins: list[tuple[int, int]], size: int,
           mean: float, std: float):
    import torch

    x = np.stack([pair.embeddings[:, r:r + size, c:c + size] for r, c in origins])
    y = np.stack([pair.reference[r:r + size, c:c + size] for r, c in origins])
    m = np.stack([mask[r:r + size, c:c + size] for r, c in origins])
    x = torch.from_numpy(np.nan_to_num(x, nan=0.0))
    y = torch.from_numpy(np.where(m, (np.nan_to_num(y) - mean) / std, 0.0).astype(np.float32))
    return x, y, torch.from_numpy(m)


def masked_loss(pred, target, mask, kind: str = "mse"):
    """Loss over labelled pixels only: nodata in embeddings or reference never counts."""
    import torch.nn.functional as F

    pred, target = pred[mask], target[mask]
    if pred.numel() == 0:
        return pred.sum() * 0.0
    if kind == "huber":
        return F.huber_loss(pred, target, delta=1.0)
    return F.mse_loss(pred, target)


def train_model(config: TrainConfig, log: Log = print) -> TrainResult:
    """Train, keep the best epoch on validation, save the model package and evaluate it."""
    import torch

    started = time.perf_counter()
    model_config = architecture_config(config.arch, config.encoder, config.encoder_depth, config.decoder_channels)
    _check(config, size_multiple(model_config))
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "already exists and is not empty", "Choose a new output folder for the model")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    pair = load_pair(config.embeddings, config.reference)
    split = contiguous_split(pair.grid.width, pair.grid.height, config.test_fraction,
                             config.validation_fraction, config.direction)
    mask = pair.label_mask
    train_mask = np.zeros_like(mask)
    train_mask[split.train.toslices()] = mask[split.train.toslices()]
    if not train_mask.any():
        raise InputError(config.reference, "has no valid pixel in the training area",
                         "Check its nodata and that it covers the embeddings")
    mean = float(pair.reference[train_mask].mean())
    std = float(pair.reference[train_mask].std()) or 1.0

    device = select_device(config.device)
    model = build_model(model_config).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs * config.steps_per_epoch)
    train_patches = _Patches(pair, split.train, config.patch_size, rng)
    val_origins = _Patches(pair, split.validation, min(config.patch_size, int(split.validation.width),
                                                       int(split.validation.height)) // size_multiple(model_config)
                           * size_multiple(model_config), rng)
    log(f"training {config.arch}/{config.encoder} on {describe_device(device)}: "
        f"{config.epochs} epochs x {config.steps_per_epoch} steps, batch {config.batch_size} x "
        f"{config.patch_size}px, target mean {mean:.1f} m, std {std:.1f} m")

    history: list[dict] = []
    best = (float("inf"), None, -1)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            origins = [train_patches.origin() for _ in range(config.batch_size)]
            x, y, m = _batch(pair, mask, origins, config.patch_size, mean, std)
            x, y, m = x.to(device), y.to(device), m.to(device)
            loss = masked_loss(model(x)[:, 0], y, m, config.loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        val = _validate(model, pair, mask, val_origins, mean, std, config.loss, device)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if val < best[0]:
            best = (val, copy.deepcopy(model.state_dict()), epoch)
        eta = row["seconds"] * (config.epochs - epoch)
        log(f"epoch {epoch:3d}/{config.epochs}  train {row['train_loss']:.4f}  val {val:.4f}"
            f"{'  *best' if best[2] == epoch else ''}  {row['seconds']:.0f}s  ETA {eta / 60:.1f} min")
        if epoch - best[2] >= config.patience:
            log(f"early stop: no validation gain for {config.patience} epochs (best epoch {best[2]})")
            break

    model.load_state_dict(best[1])
    model = model.cpu().eval()
    card = _card(config, model_config, split, pair, mean, std, best[2], history)
    result = _save_and_evaluate(model, card, split, config, out, log, history)
    result.seconds = time.perf_counter() - started
    return result


def _validate(model, pair, mask, patches: _Patches, mean, std, kind, device) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    size = patches.size
    with torch.inference_mode():
        for origin in patches.grid_origins():
            x, y, m = _batch(pair, mask, [origin], size, mean, std)
            if m.any():
                loss = masked_loss(model(x.to(device))[:, 0], y.to(device), m.to(device), kind)
                total += float(loss) * int(m.sum())
                count += int(m.sum())
    return total / max(count, 1)


def _card(config: TrainConfig, model_config: dict, split: Split, pair: AlignedPair, mean: float, std: float,
          best_epoch: int, history: list[dict]) -> dict:
    left, bottom, right, top = pair.grid.bounds
    return make_card(
        model_config, name=config.name or f"{config.arch}-{config.encoder}-{Path(config.out).name}",
        target_mean=mean, target_std=std, tile=config.tile, overlap=config.overlap,
        training={
            "embeddings": Path(config.embeddings).name, "reference": Path(config.reference).name,
            "region": config.region, "year": config.year, "crs": pair.grid.crs.to_string(),
            "bounds": [left, bottom, right, top], "resolution_m": pair.grid.resolution[0],
            "split": split.as_dict(),
            "loss": config.loss, "optimizer": {"name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay},
            "schedule": "cosine", "patch_size": config.patch_size, "batch_size": config.batch_size,
            "epochs_run": len(history), "best_epoch": best_epoch, "steps_per_epoch": config.steps_per_epoch,
            "seed": config.seed,
        })


def _save_and_evaluate(model, card: dict, split: Split, config: TrainConfig, out: Path, log: Log,
                       history: list[dict]) -> TrainResult:
    """Write the package, then predict the whole scene with it and record train/test metrics."""
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=out.parent if out.parent.is_dir() else None))
    try:
        save_model(staging, model, card)
        package_dir = staging
        with tempfile.TemporaryDirectory() as scratch:
            predicted = Path(scratch) / "predicted.tif"
            predict_height(config.embeddings, ModelPackage(model, card, package_dir), predicted,
                           device=config.device)
            regions = {"train": window_union(split.train, split.validation), "test": split.test}
            comparison = compare_heights(predicted, config.reference, regions=regions)
        metrics = {name: {k: v for k, v in m.items() if k != "window"}
                   for name, m in comparison["regions"].items()}
        card["metrics"] = metrics
        save_model(staging, model, card)
        (staging / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        _write_history(staging / "history.csv", history)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"model written to {out}: test R² {metrics['test']['r2']:.3f}, RMSE {metrics['test']['rmse']:.2f} m")
    return TrainResult(out, history=history, metrics=metrics)


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_loss", "seconds"])
        writer.writeheader()
        writer.writerows(history)
