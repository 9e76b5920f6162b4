"""Training a height model on aligned embeddings + reference pairs (the paper's recipe:
U-Net/U-Net++, masked MSE, AdamW lr 1e-3 wd 1e-4, early stopping on validation), with
leak-free splits, resumable checkpoints and options that address distribution shift.

A run folder holds the model package (model.json + model.safetensors, loadable like the
bundled model), config.json, history.csv, checkpoint/ while the run is unfinished (or
always with ``keep_checkpoint``) and evaluation/ (the report of ``training.evaluate``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..plugin.core.choices import LOSSES, SCHEDULES, check_choice
from ..plugin.core.dem import ATTRIBUTION as DEM_ATTRIBUTION
from ..plugin.core.dem import is_product, product
from ..plugin.core.device import describe_device, precision_policy, select_device
from ..plugin.core.errors import InputError
from ..plugin.core.models import architecture_config, build_model, make_card, save_model, size_multiple
from ..plugin.core.rasters import check_new_folder, check_outputs
from .checkpoint import FOLDER as CHECKPOINT_FOLDER
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import SINGLE, Group, barrier, join, leave, summed
from .patches import (Batches, PatchDataset, PatchSampler, Scene, bounded_cache, cell_for, make_scene,
                      patch_loader, target_statistics, validation_origins)
from .splits import AreaLayout, SplitSpec

Log = Callable[[str], None]
Progress = Callable[[int, int], None]


# the split's fields as config.json held them, flat, before TrainConfig.split was a SplitSpec
LEGACY_SPLIT_FIELDS = ("test_fraction", "validation_fraction", "direction", "block_size", "buffer",
                       "validation_window")


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
    accumulate: int = 1
    epochs: int = 30
    steps_per_epoch: int = 50
    patience: int = 6
    loss: str = "mse"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    split: SplitSpec = field(default_factory=SplitSpec)
    extra_pairs: list[list[str]] = field(default_factory=list)
    validation_embeddings: Optional[str] = None
    validation_reference: Optional[str] = None
    terrain: Optional[str] = None
    calibrate: bool = True      # scale the TTA spread into a 90 % interval on the validation area (card)
    balance: bool = False
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    keep_checkpoint: bool = False
    name: str = ""
    region: str = ""
    year: Optional[int] = None
    tile: int = 608
    overlap: int = 64
    max_minutes: Optional[float] = None  # no epoch starts that would end past this; the best epoch is kept
    workers: int = field(default_factory=lambda: default_workers())  # patch-reading processes (0: none)

    def with_absolute_paths(self, base: Optional[Path] = None) -> "TrainConfig":
        """A copy with every file path absolute (relative ones taken from ``base``, default the cwd).

        config.json stores these, so ``--resume`` works from any working directory.
        """
        base = Path.cwd() if base is None else Path(base)

        def absolute(path):
            return None if path in (None, "") else str((base / Path(path).expanduser()).absolute())

        terrain = self.terrain if is_product(self.terrain) else absolute(self.terrain)  # "copernicus-30" stays
        return replace(self, embeddings=absolute(self.embeddings), reference=absolute(self.reference),
                       out=absolute(self.out), terrain=terrain,
                       validation_embeddings=absolute(self.validation_embeddings),
                       validation_reference=absolute(self.validation_reference),
                       extra_pairs=[[absolute(p) for p in pair] for pair in self.extra_pairs])

    def input_paths(self) -> dict[str, str]:
        """Every input file by the option that names it."""
        paths = {"embeddings": self.embeddings, "reference": self.reference,
                 "terrain": None if is_product(self.terrain) else self.terrain,
                 "validation embeddings": self.validation_embeddings,
                 "validation reference": self.validation_reference}
        for i, (emb, ref) in enumerate(self.extra_pairs, start=1):
            paths[f"pair {i} embeddings"], paths[f"pair {i} reference"] = emb, ref
        return {k: v for k, v in paths.items() if v}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from its JSON form (config.json, the worker's parameters).

        Runs written before the split was nested hold its fields flat, the kind as
        ``split`` and the training seed as the split's: they are read into a SplitSpec
        so such a run still resumes.
        """
        values = dict(values)
        split = values.get("split")
        if not isinstance(split, dict):
            flat = {name: values.pop(name) for name in LEGACY_SPLIT_FIELDS if name in values}
            split = {**flat, "kind": values.pop("split", "contiguous"), "seed": values.get("seed", 0)}
        values["split"] = split if isinstance(split, SplitSpec) else SplitSpec.from_dict(split)
        return cls(**values)


# The recipe on a CPU: the GPU one (TrainConfig's defaults: 256 px, batch 8, 50 steps) takes 10+ s a step
# there, so a first epoch would take many minutes; this one's took 17 s on the demo scene on 2 cores.
CPU_RECIPE = {"patch_size": 128, "batch_size": 4, "steps_per_epoch": 20}
GPU_RECIPE = {"patch_size": 256, "batch_size": 8, "steps_per_epoch": 50}


def default_workers() -> int:
    """DataLoader processes reading patches: one per 4 CPU cores, at most 4. On a small machine
    none, since reader processes there only compete with the training threads for the cores."""
    return min(4, (os.cpu_count() or 1) // 4)


def recipe_for(device: str) -> dict:
    """Patch size, batch size and steps per epoch suited to where ``device`` ("auto" resolved) runs."""
    return dict(CPU_RECIPE if select_device(device).type == "cpu" else GPU_RECIPE)


@dataclass
class TrainResult:
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    initial_val_loss: float = float("nan")


def _check(config: TrainConfig, multiple: int) -> None:
    check_choice(config.loss, LOSSES, "loss")
    check_choice(config.schedule, SCHEDULES, "schedule")
    if config.patch_size % multiple:
        raise InputError(f"patch size {config.patch_size}", f"is not a multiple of {multiple}, which this "
                         "architecture needs", f"Use e.g. {max(multiple, config.patch_size // multiple * multiple)}")
    if config.workers < 0:
        raise InputError(f"workers {config.workers}", "must not be negative", "Give 0 or more")
    for name in ("batch_size", "epochs", "steps_per_epoch", "accumulate", "patience"):
        if getattr(config, name) < 1:
            raise InputError(f"{name.replace('_', ' ')} {getattr(config, name)}", "must be at least 1",
                             "Give a positive number")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise InputError(f"max minutes {config.max_minutes}", "must be positive", "Give e.g. 30, or leave it out")
    if bool(config.validation_embeddings) != bool(config.validation_reference):
        raise InputError("validation pair", "needs both embeddings and reference",
                         "Give --validation-embeddings and --validation-reference together")


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def masked_loss(pred, target, mask, kind: str = "mse"):
    """Loss over labelled pixels only: nodata in embeddings or reference never counts."""
    import torch.nn.functional as F

    pred, target = pred[mask], target[mask]
    if pred.numel() == 0:
        return pred.sum() * 0.0
    if kind == "huber":
        return F.huber_loss(pred, target, delta=1.0)
    if kind == "l1":
        return F.l1_loss(pred, target)
    return F.mse_loss(pred, target)


def load_scenes(config: TrainConfig) -> list[Scene]:
    """Training pairs split into areas, plus the separate validation pair when given; each is
    scanned once by tiles into coarse cells (nothing is held at full resolution)."""
    from ..plugin.core.rasters import EmbeddingRaster

    spec, cell = config.split, cell_for(config.patch_size)
    separate = bool(config.validation_embeddings)
    pairs = [(config.embeddings, config.reference, False), *[(e, r, False) for e, r in config.extra_pairs]]
    if separate:
        pairs.append((config.validation_embeddings, config.validation_reference, True))
    scenes = []
    for emb, ref, validates in pairs:
        with EmbeddingRaster(emb) as source:
            grid = source.grid
        layout = AreaLayout(spec, grid.height, grid.width, separate, role="validation" if validates else "split")
        scenes.append(make_scene(emb, ref, layout, config.terrain, cell))
    return scenes


class _Trainer:
    """One run: model, optimiser, schedule and sampling state; everything a checkpoint holds."""

    def __init__(self, config: TrainConfig, log: Log, progress: Optional[Progress], group: Group = SINGLE) -> None:
        import torch

        self.group = group
        # one voice: only rank 0 logs and reports progress
        self.config = config
        self.log, self.progress = (log, progress) if group.leader else (_quiet, None)
        self.model_config = architecture_config(config.arch, config.encoder, config.encoder_depth,
                                                config.decoder_channels)
        _check(config, size_multiple(self.model_config))
        self.scenes = load_scenes(config)
        self.mean, self.std = target_statistics(self.scenes)
        self.sampler = PatchSampler(self.scenes, config.patch_size, config.balance)
        origins = validation_origins(self.scenes, config.patch_size)
        self.val_batches = [[(*o, "validation") for o in origins[i:i + config.batch_size]]
                            for i in range(0, len(origins), config.batch_size)][group.rank::group.world]
        self.dataset = PatchDataset(self.scenes, config.patch_size, self.mean, self.std)
        self.batches = Batches()
        self.loader = patch_loader(self.dataset, self.batches, config.workers)
        self.device = select_device(config.device)
        if group.active and self.device.type == "cuda":
            self.device = torch.device("cuda", group.local_rank)
        self.amp_dtype, channels_last = precision_policy(self.device, config.amp)
        self.amp = self.amp_dtype is not None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.model = build_model(self.model_config).to(self.device, memory_format=self.memory_format)
        self.net = self.model  # what the forward pass runs: the model, or its DDP wrapper on several ranks
        if group.active:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        if config.schedule == "cosine":
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimiser, T_max=config.epochs * config.steps_per_epoch)
        else:
            self.schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimiser, factor=0.5, patience=max(1, config.patience // 2))
        self.history: list[dict] = []
        self.best = {"val": float("inf"), "epoch": 0, "state": self._state()}
        self.initial_val = float("nan")

    def _state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _forward(self, x):
        import torch

        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.net(x)[:, 0].float()

    def draw_epoch(self) -> None:
        """Draw the epoch's patches (in order, from the run's generator, so a resumed run draws the same).

        Every rank draws the whole global batch of each step and keeps its own ``accumulate``
        micro-batches, so the sequence does not depend on how many processes share it."""
        c, g = self.config, self.group
        drawn = [[(*o, "train") for o in self.sampler.draw(self.rng, c.batch_size)]
                 for _ in range(c.steps_per_epoch * c.accumulate * g.world)]
        per_step = c.accumulate * g.world
        self.batches.batches = [drawn[s * per_step + g.rank * c.accumulate + a]
                                for s in range(c.steps_per_epoch) for a in range(c.accumulate)]

    def step(self, batches: Iterator) -> float:
        """One optimiser step over ``accumulate`` micro-batches taken from ``batches``."""
        c = self.config
        self.optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(c.accumulate):
            x, y, m = next(batches)
            loss = masked_loss(self._forward(x), y.to(self.device), m.to(self.device), c.loss) / c.accumulate
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        if self.config.schedule == "cosine":
            self.schedule.step()
        return total

    def validate(self) -> float:
        import torch

        self.model.eval()
        total, count = 0.0, 0
        self.batches.batches = self.val_batches
        with torch.inference_mode():
            for x, y, m in self.loader:
                n = int(m.sum())
                total += float(masked_loss(self._forward(x), y.to(self.device), m.to(self.device),
                                           self.config.loss)) * n
                count += n
        self.model.train()
        total, count = summed(self.group, total, count)
        return total / max(count, 1)

    def run_epochs(self, out: Path) -> None:
        c = self.config
        start = len(self.history) + 1
        began = time.perf_counter()
        for epoch in range(start, c.epochs + 1):
            t0 = time.perf_counter()
            self.model.train()
            losses = []
            self.draw_epoch()
            batches = iter(self.loader)
            for k in range(c.steps_per_epoch):
                losses.append(self.step(batches))
                if epoch == start and k == 0:
                    left = (c.epochs - epoch + 1) * c.steps_per_epoch
                    took = time.perf_counter() - t0
                    self.log(f"first step took {took:.1f} s: ETA {left * took / 60:.1f} "
                             f"min for the {left} steps left (validation not counted)")
                if self.progress:
                    self.progress((epoch - 1) * c.steps_per_epoch + k + 1, c.epochs * c.steps_per_epoch)
            losses = [summed(self.group, sum(losses))[0] / self.group.world / len(losses)]  # the global batch's
            val = self.validate()
            if c.schedule == "plateau":
                self.schedule.step(val)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val,
                   "lr": self.optimiser.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            self.history.append(row)
            if val < self.best["val"]:
                self.best = {"val": val, "epoch": epoch, "state": self._state()}
            stop = epoch - self.best["epoch"] >= c.patience
            self.save(out)
            eta = np.mean([r["seconds"] for r in self.history[start - 1:]]) * (c.epochs - epoch)
            self.log(f"epoch {epoch:3d}/{c.epochs}  train {row['train_loss']:.4f}  val {val:.4f}"
                     f"{'  *best' if self.best['epoch'] == epoch else ''}  {row['seconds']:.0f}s  "
                     f"ETA {eta / 60:.1f} min")
            if stop:
                self.log(f"early stop: no validation gain for {c.patience} epochs (best epoch {self.best['epoch']})")
                break
            spent = time.perf_counter() - began
            over = bool(c.max_minutes) and epoch < c.epochs and spent + spent / (epoch - start + 1) > c.max_minutes * 60
            if summed(self.group, float(over))[0]:  # every rank stops when any would overrun
                self.log(f"time limit: another epoch would end past {c.max_minutes:g} min; keeping the best epoch "
                         f"({self.best['epoch']})")
                break

    def save(self, out: Path) -> None:
        """The checkpoint (rank 0 writes it; the others wait, so none runs ahead of a checkpoint)."""
        if not self.group.leader:
            barrier(self.group)
            return
        state = {"epoch": len(self.history), "history": self.history, "best_val": self.best["val"],
                 "best_epoch": self.best["epoch"], "initial_val": self.initial_val,
                 "numpy_rng": self.rng.bit_generator.state, "schedule": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict()}
        save_checkpoint(out, self.model, self.best["state"], self.optimiser, state)
        barrier(self.group)

    def restore(self, out: Path) -> None:
        state, best = load_checkpoint(out, self.model, self.optimiser)
        self.history = state["history"]
        self.best = {"val": state["best_val"], "epoch": state["best_epoch"], "state": best}
        self.initial_val = state["initial_val"]
        self.rng.bit_generator.state = state["numpy_rng"]
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        """Stop the reading workers and close this process's rasters."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataset.close()

    def describe(self) -> str:
        c = self.config
        return (f"training {c.arch}/{c.encoder} on {describe_device(self.device)}: {c.epochs} epochs x "
                f"{c.steps_per_epoch} steps, batch {c.batch_size}x{c.accumulate} of {c.patch_size}px patches "
                f"({len(self.sampler.origins)} to draw from, read by {c.workers or 'no'} worker"
                f"{'s' * (c.workers != 1)}), target mean {self.mean:.1f} m, std {self.std:.1f} m"
                f"{' above the coarse terrain' if c.terrain else ''}; validation loss before training "
                f"{self.initial_val:.4f}; {c.epochs * c.steps_per_epoch} steps at most"
                f"{f' or {c.max_minutes:g} min' if c.max_minutes else ''}; the model will be written to {c.out}")


def train_model(config: TrainConfig, log: Log = print, progress: Optional[Progress] = None) -> TrainResult:
    """Train from scratch into a new run folder; Ctrl-C leaves a checkpoint to resume from."""
    started = time.perf_counter()
    with bounded_cache():  # GDAL's cache would otherwise grow with the area read
        config = config.with_absolute_paths()  # config.json must not depend on the working directory
        out = Path(config.out)
        group = join(config.device)  # several processes under torchrun; one otherwise
        check_new_folder(out, "the model")
        check_outputs(folders={"the model folder": out}, inputs=config.input_paths())
        trainer = _Trainer(config, log, progress, group)  # reads and checks every input before writing anything
        barrier(group)  # every rank has checked the folder before rank 0 creates it
        if group.leader:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        trainer.initial_val = trainer.validate()
        trainer.log(trainer.describe())
        return _finish(trainer, out, started)


def resume_training(run_dir: str | os.PathLike, log: Log = print, progress: Optional[Progress] = None) -> TrainResult:
    """Continue an interrupted run from its last epoch: same result as an uninterrupted run."""
    started = time.perf_counter()
    with bounded_cache():  # GDAL's cache would otherwise grow with the area read
        out = Path(run_dir)
        if not (out / "config.json").is_file():
            raise InputError(out, "is not a training run folder (no config.json)",
                             "Give the --out folder of a train run")
        if (out / "model.json").is_file():
            raise InputError(out, "holds a finished run", "Train a new model into a new folder instead")
        config = _stored_config(out)
        trainer = _Trainer(config, log, progress, join(config.device))
        trainer.restore(out)
        trainer.log(f"resuming {out} after epoch {len(trainer.history)} of {config.epochs}")
        return _finish(trainer, out, started)


def _stored_config(out: Path) -> TrainConfig:
    """The run's config.json; paths written relative by older versions must still be found from here."""
    path = out / "config.json"
    try:
        config = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"is damaged or not a training configuration ({exc})",
                         "Start a new run; the checkpoint cannot be used without it") from None
    for name, value in config.input_paths().items():
        if not Path(value).is_absolute() and not Path(value).exists():
            raise InputError(value, f"({name} in {path}) is a relative path that does not exist from "
                             f"{Path.cwd()}", "Resume from the folder the run was started in, or write the "
                             "absolute path into config.json")
    return replace(config.with_absolute_paths(), out=str(out.absolute()))


def _finish(trainer: _Trainer, out: Path, started: float) -> TrainResult:
    import torch

    try:
        trainer.run_epochs(out)
    finally:
        trainer.close()
    if not trainer.group.leader:  # rank 0 evaluates and writes the package
        barrier(trainer.group)
        leave(trainer.group)
        return TrainResult(out, trainer.history, {}, time.perf_counter() - started, trainer.initial_val)
    model = trainer.model.cpu().to(memory_format=torch.contiguous_format)
    model.load_state_dict(trainer.best["state"])
    model.eval()
    card = _card(trainer, out)
    metrics = _save_and_evaluate(model, card, trainer, out)
    if not trainer.config.keep_checkpoint:
        shutil.rmtree(out / CHECKPOINT_FOLDER, ignore_errors=True)
    barrier(trainer.group)
    leave(trainer.group)
    return TrainResult(out, trainer.history, metrics, time.perf_counter() - started, trainer.initial_val)


def _card(trainer: _Trainer, out: Path) -> dict:
    c, scene = trainer.config, trainer.scenes[0]
    left, bottom, right, top = scene.grid.bounds
    target = {"relative_to": terrain_card(c.terrain)} if c.terrain else {}
    card = make_card(
        trainer.model_config, name=c.name or f"{c.arch}-{c.encoder}-{out.name}",
        target_mean=trainer.mean, target_std=trainer.std, tile=c.tile, overlap=c.overlap,
        training={
            "embeddings": Path(c.embeddings).name, "reference": Path(c.reference).name,
            "extra_pairs": [[Path(p).name for p in pair_] for pair_ in c.extra_pairs],
            "region": c.region, "year": c.year, "crs": scene.grid.crs.to_string(),
            "bounds": [left, bottom, right, top], "resolution_m": scene.grid.resolution[0],
            "split": {**c.split.as_dict(), "pixels": scene.pixels},
            "loss": c.loss, "optimizer": {"name": "AdamW", "lr": c.lr, "weight_decay": c.weight_decay},
            "schedule": c.schedule, "patch_size": c.patch_size, "batch_size": c.batch_size,
            "accumulate": c.accumulate, "balanced_sampling": c.balance, "epochs_run": len(trainer.history),
            "best_epoch": trainer.best["epoch"], "steps_per_epoch": c.steps_per_epoch, "seed": c.seed,
        })
    card["target"]["normalisation"]["from"] = "training area"
    card["target"].update(target)
    return card


def terrain_card(terrain: str) -> dict:
    """The card's ``target.relative_to``: the terrain input a prediction must be given again.

    A DEM product is named (``product``), so the dock and Processing can offer the same one.
    """
    if is_product(terrain):
        p = product(terrain)
        return {"input": "coarse terrain", "product": p.key, "file": f"Copernicus DEM {p.name}",
                "attribution": DEM_ATTRIBUTION}
    return {"input": "coarse terrain", "file": Path(terrain).name}


def _save_and_evaluate(model, card: dict, trainer: _Trainer, out: Path) -> dict:
    """Evaluate on the run's own split, then write the package (card last, with the metrics)."""
    from ..plugin.core.models import CARD_FILE, ONNX_FILE, WEIGHTS_FILE, ModelPackage
    from .calibration import calibrate_on_validation
    from .evaluate import evaluate_model

    c = trainer.config
    if c.calibrate:  # first, so the evaluation reports how often the calibrated interval holds
        scene = next((s for s in trainer.scenes if s.validation_cells.any()), None)
        if scene is not None:
            calibration = calibrate_on_validation(ModelPackage(model, card, out), scene, device=c.device,
                                                  workdir=out, log=trainer.log)
            if calibration:
                card["uncertainty"] = calibration
    report = evaluate_model(ModelPackage(model, card, out), c.embeddings, c.reference, out / "evaluation",
                            c.split, terrain=c.terrain, device=c.device, keep_rasters=False,
                            uncertainty="uncertainty" in card, log=trainer.log)
    # no test area (--test-fraction 0): the card holds train and validation figures, never a test it did not run
    names = ("train", "test") if "test" in report["areas"] else ("train", "validation")
    metrics = {name: report["areas"][name]["model"] for name in names if name in report["areas"]}
    card["metrics"] = metrics
    interval = report.get("uncertainty_interval")
    if interval and "test" in interval["coverage"]:
        card["uncertainty"]["test_coverage"] = interval["coverage"]["test"]
        trainer.log(f"{interval['level']:.0%} interval (prediction ± {interval['k']:.2f} x spread) holds the "
                    f"reference on {interval['coverage']['test']:.1%} of the test area")
    staging = out / ".package"
    shutil.rmtree(staging, ignore_errors=True)
    save_model(staging, model, card)
    _write_history(out / "history.csv", trainer.history)
    for name in (WEIGHTS_FILE, ONNX_FILE, CARD_FILE):  # the card last: it names the others
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    staging.rmdir()
    judged = "test" if "test" in metrics else next(iter(metrics))
    trainer.log(f"model written to {out}: {judged} R² {metrics[judged]['r2']:.3f}, "
                f"RMSE {metrics[judged]['rmse']:.2f} m"
                + ("" if judged == "test" else " (no test area: --test-fraction 0)"))
    return metrics


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(history)
