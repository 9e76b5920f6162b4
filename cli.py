"""`alphaearth-height`: the command line over the same functions the QGIS plugin calls."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .plugin.core import choices
from .plugin.core.errors import InputError
from .plugin.core.sizes import DEFAULT_MAX_MPX, MAX_MPX_ENV, default_max_mpx

PROG = "alphaearth-height"


class _Bar:
    """A tqdm progress bar driven by (done, total) callbacks."""

    def __init__(self, label: str, unit: str = "tile") -> None:
        self.label, self.unit, self.bar = label, unit, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit=self.unit, file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def write(self, message: str) -> None:
        """A log line printed above the bar (the bar shows the ETA)."""
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_outputs(files: Optional[dict] = None, inputs: Optional[dict] = None, folders: Optional[dict] = None) -> None:
    """Every command's outputs against each other and its inputs, before any work (labels are the options)."""
    from .plugin.core.rasters import check_outputs

    check_outputs(files or {}, inputs=inputs or {}, folders=folders or {})


def _status(message: str) -> None:
    """What a fetch is waiting for (index download, retries), on stderr above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {message}", file=sys.stderr)


def _check_cluster_args(args: argparse.Namespace) -> None:
    """fetch/predict: --chunk-size and --cog only mean something on a cluster."""
    if (args.chunk_size is not None or args.cog) and not (args.workers or args.scheduler):
        raise InputError("--chunk-size/--cog", "only apply to a run on a Dask cluster",
                         "Add --workers N (this machine) or --scheduler tcp://HOST:PORT, or leave them out")


def _fetch(args: argparse.Namespace) -> None:
    from .plugin.core.aoi import AreaOfInterest
    from .plugin.core.fetch import check_size, estimate, fetch, format_estimate, size_limit_gb, source_options

    if args.source == "local" and not args.local_raster:
        raise InputError("--local-raster", "is required with --source local", "Give the embeddings raster to clip")
    if not args.out and not args.estimate_only:
        raise InputError("fetch", "has nowhere to write", "Give --out, or --estimate-only for the size alone")
    if args.out:
        _check_outputs({"--out": args.out}, {"--local-raster": args.local_raster})
    _check_cluster_args(args)
    aoi = AreaOfInterest(*args.aoi, crs=args.aoi_crs)
    options = source_options(args.source, raster=args.local_raster, project=args.project, base_url=args.base_url)
    limit = size_limit_gb(args.max_gb)  # checked before anything (an index download) goes online
    allow = "Give --yes to go ahead, or --max-gb N to raise the limit"
    info = estimate(aoi, args.year, args.source, cache_dir=args.cache_dir, status=_status,
                    limit_gb=None if args.yes or args.estimate_only else limit, allow=allow, **options)
    print(format_estimate(info))
    if args.estimate_only:
        try:
            check_size(info, limit, allow)
        except InputError as exc:
            print(f"note: fetching this needs --yes or --max-gb: {exc.problem}")
        return
    if args.workers or args.scheduler:
        from .plugin.core.distributed import DEFAULT_CHUNK, fetch_distributed, open_client

        bar = _Bar("fetching", unit="chunk")
        try:
            with open_client(args.workers, args.scheduler) as client:
                result = fetch_distributed(aoi, args.year, args.source, args.out, client=client,
                                           chunk_size=args.chunk_size or DEFAULT_CHUNK, cog=args.cog,
                                           cache_dir=args.cache_dir, progress=bar, **options)
        finally:
            bar.close()
        print(f"wrote {result.path} ({result.grid.width}x{result.grid.height} px, {result.chunks} chunks: "
              f"{result.done} run, {result.skipped} already done; {result.seconds:.1f} s)")
        return
    bar = _Bar("fetching")
    try:
        result = fetch(aoi, args.year, args.source, args.out, cache_dir=args.cache_dir, progress=bar,
                       status=_status, **options)
    finally:
        bar.close()
    damaged = f", {result.damaged} damaged cached tile(s) fetched again" if result.damaged else ""
    print(f"wrote {result.path} ({result.grid.width}x{result.grid.height} px, {result.tiles} tiles: "
          f"{result.fetched} fetched, {result.from_cache} from cache{damaged}; {result.valid_fraction:.0%} with data; "
          f"{result.seconds:.1f} s)")


def _dem_base_url(args: argparse.Namespace) -> None:
    """--dem-base-url: the Copernicus DEM mirror for this run (and the worker processes it starts)."""
    from .plugin.core.dem import is_product, product

    url = getattr(args, "dem_base_url", None)
    if url and is_product(getattr(args, "terrain", None)):
        os.environ[product(args.terrain).url_env] = url


def _fetch_terrain(args: argparse.Namespace) -> None:
    from .plugin.core.aoi import AreaOfInterest
    from .plugin.core.dem import ATTRIBUTION, product
    from .plugin.core.fetch.copernicus import aoi_grid, fetch_terrain
    from .plugin.core.rasters import EmbeddingRaster, grow_grid, open_raster

    if bool(args.aoi) == bool(args.like):
        raise InputError("fetch-terrain", "needs exactly one of --aoi and --like",
                         "Give --aoi XMIN YMIN XMAX YMAX, or --like RASTER for that raster's grid")
    _check_outputs({"--out": args.out}, {"--like": args.like})
    dem = product(args.product)
    if args.aoi:
        grid = aoi_grid(AreaOfInterest(*args.aoi, crs=args.aoi_crs), args.resolution, args.margin)
    else:
        with open_raster(args.like) as src:
            bands = src.count
        if bands == 64:
            with EmbeddingRaster(args.like) as raster:  # north-up even when stored bottom-up
                grid = raster.grid
        else:
            from .plugin.core.rasters import read_height_grid

            src, grid = read_height_grid(args.like)
            src.close()
        grid = grow_grid(grid, max(0, round(args.margin / grid.resolution[0])))
    print(f"Copernicus DEM {dem.name} from {dem.base_url(args.base_url)} onto {grid.width}x{grid.height} px "
          f"({grid.resolution[0]:g} m) in {grid.crs.to_string()}")
    bar = _Bar("DEM tiles", unit="tile")
    try:
        result = fetch_terrain(grid, args.out, dem, base_url=args.base_url, cache_dir=args.cache_dir,
                               progress=bar, status=lambda message: print(f"{PROG}: {message}", file=sys.stderr))
    finally:
        bar.close()
    print(result.summary())
    if result.absent:
        print(f"open sea (no DEM tile, height 0 m): {', '.join(result.absent)}")
    print(f"Copernicus DEM attribution (kept in the file's metadata): {ATTRIBUTION}")


def _predict(args: argparse.Namespace) -> None:
    _dem_base_url(args)
    from .plugin.core.models import bundled_model_dir, open_package
    from .plugin.core.terrain import predict_surface
    from .plugin.core.uncertainty import predict_uncertainty

    if args.max_mpx is not None and not args.max_mpx > 0:
        raise InputError(f"--max-mpx {args.max_mpx:g}", "must be a positive number of megapixels",
                         "Give e.g. --max-mpx 500, or --yes for no limit")
    max_mpx = None if args.yes else args.max_mpx if args.max_mpx is not None else default_max_mpx()
    options = dict(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                   amp=not args.no_amp, max_mpx=max_mpx,
                   too_large_fix="Add --yes to run it anyway (or raise --max-mpx), or clip the embeddings "
                                 "to a smaller area first")
    _check_outputs({"--out": args.out, "--uncertainty": args.uncertainty},
                   {"--embeddings": args.embeddings, "--terrain": args.terrain})
    _check_cluster_args(args)
    package = open_package(args.model or bundled_model_dir())
    if args.workers or args.scheduler:
        _predict_on_cluster(args, package, max_mpx)
        return
    bar = _Bar("predicting")
    try:
        result = predict_surface(args.embeddings, package, args.out, args.terrain, progress=bar,
                                 backend=args.backend, **options)
    finally:
        bar.close()
    print(f"wrote {result.path} ({result.grid.width}x{result.grid.height} px, {result.tiles} tiles, "
          f"{result.seconds:.1f} s on {result.device})")
    if args.uncertainty:
        bar = _Bar("uncertainty (8 augmentations)")
        try:
            spread = predict_uncertainty(args.embeddings, package, args.uncertainty, progress=bar, **options)
        finally:
            bar.close()
        print(f"wrote {spread.path} (test-time augmentation spread, {spread.seconds:.1f} s)")
        _print_interval(package)


def _print_interval(package: Any) -> None:
    """The card's calibration, when it has one: how to read the spread as a 90 % interval."""
    k = package.card.get("uncertainty", {}).get("k")
    if k:
        print(f"90 % interval: prediction ± {k:.2f} x spread (scale calibrated on the model's validation area)")


def _predict_on_cluster(args: argparse.Namespace, package: Any, max_mpx: Optional[float]) -> None:
    """predict on Dask: the heights, then (--uncertainty) the TTA spread, each its own chunk run.

    Both outputs are checked before the first chunk, so a bad --uncertainty name is not found
    only after the heights' hours.
    """
    from .plugin.core.distributed import DEFAULT_CHUNK, check_distributed_output, open_client, predict_distributed

    check_distributed_output(args.out, args.cog)
    if args.uncertainty:
        check_distributed_output(args.uncertainty, args.cog)
    options = dict(chunk_size=args.chunk_size or DEFAULT_CHUNK, cog=args.cog, tile=args.tile, overlap=args.overlap,
                   batch_size=args.batch_size, device=args.device, amp=not args.no_amp, backend=args.backend,
                   max_mpx=max_mpx)
    runs = [("predicting", args.out, dict(terrain=args.terrain))]
    if args.uncertainty:
        runs.append(("uncertainty (8 augmentations)", args.uncertainty, dict(uncertainty=True)))
    with open_client(args.workers, args.scheduler) as client:
        for label, out, extra in runs:
            bar = _Bar(label, unit="chunk")
            try:
                result = predict_distributed(args.embeddings, package.path, out, client=client, progress=bar,
                                             **options, **extra)
            finally:
                bar.close()
            kept = f", chunks in {result.folder}" if result.folder else ""
            what = "test-time augmentation spread, " if extra.get("uncertainty") else ""
            print(f"wrote {result.path} ({what}{result.grid.width}x{result.grid.height} px, {result.chunks} chunks: "
                  f"{result.done} run, {result.skipped} already done{kept}; {result.seconds:.1f} s)")
    if args.uncertainty:
        _print_interval(package)


def _export_onnx(args: argparse.Namespace) -> None:
    from .plugin.core.models import export_onnx

    print(f"wrote {export_onnx(args.model)} (weights shared with model.safetensors)")


def _worker(args: argparse.Namespace) -> None:
    from .plugin.core.worker import serve

    raise SystemExit(serve())


def _compare(args: argparse.Namespace) -> None:
    from .plugin.core.compare import compare_heights
    from .plugin.core.metrics import format_metrics_table, json_safe

    if not args.out and not args.metrics:
        raise InputError("compare", "has nothing to write", "Give --out for the difference raster and/or --metrics")
    _check_outputs({"--out": args.out, "--metrics": args.metrics},
                   {"--predicted": args.predicted, "--reference": args.reference})
    metrics = compare_heights(args.predicted, args.reference, args.out, args.metrics,
                              reference_band=args.reference_band)
    print(format_metrics_table({"overall": metrics["overall"]}))
    print(format_metrics_table({f"{b['bin_min']:.0f}-{b['bin_max']:.0f} m": b for b in metrics["bins"]}))
    if args.metrics:
        print(f"metrics written to {args.metrics}")
    if args.json:
        print(json.dumps(json_safe(metrics["overall"])))


def _train(args: argparse.Namespace) -> None:
    _dem_base_url(args)
    from .training.splits import SplitSpec
    from .training.train import TrainConfig, default_workers, recipe_for, resume_training, train_model

    bar = _Bar("training", unit="step")
    try:
        if args.resume:
            _resumable(bar, args.resume, lambda: resume_training(args.resume, log=bar.write, progress=bar))
            return
        missing = [f"--{n}" for n in ("embeddings", "reference", "out") if not getattr(args, n)]
        if missing:
            raise InputError("train", f"needs {', '.join(missing)}", "Give them, or --resume RUN_DIR")
        _check_outputs(folders={"--out": args.out},
                       inputs={"--embeddings": args.embeddings, "--reference": args.reference,
                               "--terrain": args.terrain, "--validation-embeddings": args.validation_embeddings,
                               "--validation-reference": args.validation_reference,
                               **{f"--pair {i + 1} {side}": path for i, pair in enumerate(args.pair or [])
                                  for side, path in zip(("embeddings", "reference"), pair)}})
        channels = [int(c) for c in args.decoder_channels.split(",")] if args.decoder_channels else None
        config = TrainConfig(
            embeddings=args.embeddings, reference=args.reference, out=args.out, arch=args.arch,
            encoder=args.encoder, encoder_depth=args.encoder_depth, decoder_channels=channels,
            accumulate=args.accumulate, epochs=args.epochs, max_minutes=args.max_minutes, patience=args.patience,
            workers=default_workers() if args.workers is None else args.workers, loss=args.loss, lr=args.lr,
            weight_decay=args.weight_decay, schedule=args.schedule, extra_pairs=args.pair or [],
            validation_embeddings=args.validation_embeddings, validation_reference=args.validation_reference,
            terrain=args.terrain, calibrate=not args.no_calibration, balance=args.balance, amp=not args.no_amp,
            seed=args.seed, device=args.device, split=SplitSpec(seed=args.seed, **_split_options(args, {})),
            keep_checkpoint=args.keep_checkpoint, name=args.name or "", region=args.region or "", year=args.year,
            **{**recipe_for(args.device), **{name: getattr(args, name) for name in ("patch_size", "batch_size",
                                                                                   "steps_per_epoch")
                                             if getattr(args, name) is not None}})
        _resumable(bar, args.out, lambda: train_model(config, log=bar.write, progress=bar))
    finally:
        bar.close()


def _resumable(bar: "_Bar", run_dir: str, work: Callable[[], object]) -> None:
    """Run a training; on Ctrl-C, say how to continue (once: under torchrun, rank 0 alone)."""
    try:
        work()
    except KeyboardInterrupt:
        bar.close()
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: interrupted; continue with: {PROG} train --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130) from None


def _split_options(args: argparse.Namespace, base: dict) -> dict:
    """SplitSpec fields from the command line (--split is the kind); unset ones keep ``base``'s values."""
    names = {"kind": "split", "test_fraction": "test_fraction", "validation_fraction": "validation_fraction",
             "direction": "direction", "block_size": "block_size", "buffer": "buffer",
             "validation_window": "validation_window"}
    options = dict(base)
    options.update({field: getattr(args, arg) for field, arg in names.items() if getattr(args, arg) is not None})
    return options


def _evaluate(args: argparse.Namespace) -> None:
    _dem_base_url(args)
    from .plugin.core.metrics import format_metrics_table
    from .plugin.core.models import bundled_model_dir, load_model
    from .training.evaluate import evaluate_model, split_from_card
    from .training.splits import SplitSpec

    _check_outputs(folders={"--out": args.out}, inputs={"--embeddings": args.embeddings,
                                                        "--reference": args.reference, "--terrain": args.terrain})
    package = load_model(args.model or bundled_model_dir())
    options = _split_options(args, split_from_card(package.card).as_dict())
    report = evaluate_model(package, args.embeddings, args.reference, args.out, SplitSpec.from_dict(options),
                            terrain=args.terrain, device=args.device, uncertainty=args.uncertainty)
    rows = {f"{label} {name}": report["areas"][name][who] for name in ("train", "validation", "test")
            if name in report["areas"] and (name != "validation" or "test" not in report["areas"])
            for who, label in (("model", "model"), ("ridge", "ridge"), ("terrain", "terrain alone"))
            if who in report["areas"][name]}
    print(format_metrics_table(rows))
    interval = report.get("uncertainty_interval")
    if interval:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in interval["coverage"].items())
        print(f"prediction ± {interval['k']:.2f} x spread (nominal {interval['level']:.0%}, k from the "
              f"{interval['k_from']}) covers the reference on: {shares}")
    print(f"report: {args.out}/report.md")


def _calibrate(args: argparse.Namespace) -> None:
    _dem_base_url(args)
    from .training.calibration import calibrate_model

    _check_outputs(inputs={"--embeddings": args.embeddings, "--reference": args.reference})
    result = calibrate_model(args.model, args.embeddings, args.reference, terrain=args.terrain, device=args.device)
    print(f"{args.model}/model.json: prediction ± {result['k']:.2f} x spread is a {result['level']:.0%} interval "
          f"on the validation area ({result['pixels']} px, coverage {result['validation_coverage']:.1%})")


def _correct(args: argparse.Namespace) -> None:
    from .plugin.core.bias import correct_bias

    if bool(args.points) == bool(args.reference):
        raise InputError("correct", "needs exactly one source of reference heights",
                         "Give --points CSV or --reference RASTER (with --window)")
    _check_outputs({"--out": args.out}, {"--predicted": args.predicted, "--points": args.points,
                                         "--reference": args.reference, "--check-reference": args.check_reference})
    result = correct_bias(args.predicted, args.out, points=args.points, points_crs=args.points_crs,
                          reference=args.reference, window=args.window, method=args.method,
                          check_reference=args.check_reference)
    print(result.summary())


def _experiment(args: argparse.Namespace) -> None:
    from .training.experiment import ExperimentBudget, run_experiment

    _check_outputs(folders={"--out": args.out})
    budget = ExperimentBudget(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, scene_size=args.scene_size)
    result = run_experiment(args.out, budget, device=args.device)
    print(Path(args.out, "comparison.md").read_text())
    print(f"{result['seconds'] / 60:.1f} min on {result['device']}")


def _demo(args: argparse.Namespace) -> None:
    from .training.demo import run_demo

    _check_outputs(folders={"--out": args.out})
    if args.scene_only:
        from .plugin.core.demo_scene import generate_demo_scene
        from .plugin.core.rasters import check_new_folder, ensure_free_space, raster_bytes

        check_new_folder(args.out, "the demo scene")
        ensure_free_space(args.out, raster_bytes(1024, 1024, 64, "int8") + raster_bytes(2048, 2048),
                          "the demo scene")
        scene = generate_demo_scene(args.out)
        print(f"wrote {scene.embeddings} and {scene.reference}")
        return
    bar = _Bar("predicting")
    try:
        result = run_demo(args.out, model=args.model, device=args.device, progress=bar)
    finally:
        bar.close()
    print()
    print("Accuracy on the synthetic demo scene (heights in m; diff = predicted - reference):")
    print(result.table)
    print(f"\noutputs in {result.out_dir}/: embeddings.tif, reference_dsm.tif, predicted_height.tif, "
          "difference.tif, metrics.json, report.md, height_maps.png and the report's other plots")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=choices.DEVICES,
                   help="where the model runs (auto: CUDA, then Apple MPS, then CPU)")


def _add_split(p: argparse.ArgumentParser, train: bool) -> None:
    """Split options; for evaluate they default to the split recorded in the model card."""
    def default(value):
        return value if train else None

    p.add_argument("--split", default=default("contiguous"), choices=choices.SPLIT_KINDS,
                   help="contiguous strips (the paper) or random spatial blocks")
    p.add_argument("--test-fraction", type=float, default=default(0.3),
                   help="share of the scene held out for testing (0: no test area, for a model tested elsewhere)")
    p.add_argument("--validation-fraction", type=float, default=default(0.1),
                   help="share of the scene held out for early stopping (0 with a validation window or pair)")
    p.add_argument("--direction", default=default("east"), choices=choices.DIRECTIONS,
                   help="side of the scene held out for testing (contiguous split)")
    p.add_argument("--block-size", type=int, default=default(128), help="block side in pixels (blocks split)")
    p.add_argument("--buffer", type=int, default=default(0),
                   help="pixels kept out of training around the test and validation areas")
    p.add_argument("--validation-window", nargs=4, type=int, metavar=("COL", "ROW", "WIDTH", "HEIGHT"),
                   help="validation area as a pixel window (instead of the validation strip or blocks)")


TERRAIN_HELP_PREDICT = ("coarse terrain, for models trained with --terrain: copernicus-30 / copernicus-90 (the "
                        "Copernicus DEM fetched for the embeddings from its public COGs, cached) or a raster file")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    """The Dask options of predict and fetch (core.distributed)."""
    p.add_argument("--workers", type=int, metavar="N",
                   help="run on a Dask LocalCluster of N worker processes on this machine (needs the [dask] extra)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run on an existing Dask cluster (its scheduler)")
    p.add_argument("--chunk-size", type=int, metavar="PX",
                   help="with --workers/--scheduler: chunk side in px, one task each (default 2048)")
    p.add_argument("--cog", action="store_true",
                   help="with --workers/--scheduler and a .tif --out: one Cloud-Optimized GeoTIFF with overviews "
                        "(a .vrt --out is a VRT over the chunk files in OUT.chunks/)")


def _add_dem_base_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dem-base-url", metavar="URL",
                   help="Copernicus DEM mirror for --terrain copernicus-30/90 (default: the public AWS bucket, or "
                        "$ALPHAEARTH_HEIGHT_COPERNICUS_30_URL / _90_URL)")


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``; options without one (None, a flag's False) say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Surface height at 10 m from AlphaEarth embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch AlphaEarth embeddings for an area and year (prints the size first)")
    p.add_argument("--source", required=True, choices=choices.SOURCES,
                   help="earthengine (needs an account and Cloud project), cog (public COGs, no account) "
                        "or local (clip/warp a raster on disk)")
    p.add_argument("--aoi", required=True, nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="area of interest in --aoi-crs")
    p.add_argument("--aoi-crs", default="EPSG:4326", help="CRS of --aoi (default EPSG:4326)")
    p.add_argument("--year", required=True, type=int, help=f"embedding year ({choices.FIRST_YEAR} onwards)")
    p.add_argument("--out", help="output embeddings GeoTIFF (AEF int8, 64 bands)")
    p.add_argument("--local-raster", help="embeddings raster for --source local")
    p.add_argument("--project", help="Google Cloud project for --source earthengine "
                                     "(default: $EARTHENGINE_PROJECT or the one stored by earthengine)")
    p.add_argument("--base-url", help="COG mirror for --source cog (default: Source Cooperative)")
    p.add_argument("--cache-dir", help="tile cache (default: $ALPHAEARTH_HEIGHT_CACHE or ~/.cache/alphaearth_height)")
    p.add_argument("--estimate-only", action="store_true", help="print the size estimate and stop")
    p.add_argument("--yes", action="store_true",
                   help="go ahead with a fetch over the size limit (downloading or writing more than --max-gb)")
    p.add_argument("--max-gb", type=float, metavar="GB",
                   help="size limit in GB downloaded or written; larger fetches need --yes "
                        "(default: $ALPHAEARTH_HEIGHT_MAX_GB or 5)")
    _add_cluster(p)
    p.set_defaults(run=_fetch)

    p = sub.add_parser("fetch-terrain", help="the Copernicus DEM (GLO-30/GLO-90, public COGs) for an area, "
                                             "as a terrain input")
    p.add_argument("--aoi", nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="area of interest in --aoi-crs (the output is in its UTM zone)")
    p.add_argument("--aoi-crs", default="EPSG:4326", help="CRS of --aoi (default EPSG:4326)")
    p.add_argument("--like", metavar="RASTER", help="instead of --aoi: the grid of this raster (e.g. the embeddings)")
    p.add_argument("--out", required=True, help="output terrain GeoTIFF (float32, m above the EGM2008 geoid)")
    p.add_argument("--product", default="copernicus-30", choices=choices.TERRAIN_PRODUCTS,
                   help="GLO-30 (1 arc-second) or GLO-90 (3 arc-seconds); default copernicus-30")
    p.add_argument("--resolution", type=float, default=10.0,
                   help="pixel size in m with --aoi (default 10: the embeddings' grid)")
    p.add_argument("--margin", type=float, default=640.0,
                   help="metres added around the area (default 640: the 64 px of context predictions use)")
    p.add_argument("--base-url", help="Copernicus DEM mirror (default: the public AWS bucket of the product, or "
                                      "$ALPHAEARTH_HEIGHT_COPERNICUS_30_URL / _90_URL)")
    p.add_argument("--cache-dir", help="tile cache (default: $ALPHAEARTH_HEIGHT_CACHE or ~/.cache/alphaearth_height)")
    p.set_defaults(run=_fetch_terrain)

    p = sub.add_parser("predict", help="predict a height raster from an embeddings raster")
    p.add_argument("--embeddings", required=True, help="64-band embeddings GeoTIFF (AEF int8 or float)")
    p.add_argument("--model", help="model folder (model.json + model.safetensors); default: the bundled model")
    p.add_argument("--out", required=True, help="output height GeoTIFF")
    p.add_argument("--tile", type=int, help="tile size in pixels (default: the model card's)")
    p.add_argument("--overlap", type=int, help="overlap between tiles in pixels (default: the model card's)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--no-amp", action="store_true", help="full precision on CUDA (AMP is on by default there)")
    p.add_argument("--terrain", metavar="copernicus-30|copernicus-90|FILE", help=TERRAIN_HELP_PREDICT)
    _add_dem_base_url(p)
    p.add_argument("--uncertainty", metavar="U_TIF",
                   help="also write the test-time augmentation spread (m) here (on a cluster: a .vrt or .tif, "
                        "chunks of its own)")
    p.add_argument("--backend", default="auto", choices=choices.BACKENDS,
                   help="auto: ONNX Runtime on the CPU when the model has an ONNX graph, PyTorch on a GPU")
    p.add_argument("--max-mpx", type=float,
                   help=f"refuse embeddings larger than this many megapixels (default ${MAX_MPX_ENV} or "
                        f"{DEFAULT_MAX_MPX:g}, 100 km x 100 km at 10 m)")
    p.add_argument("--yes", action="store_true", help="run whatever the size (no --max-mpx limit)")
    _add_device(p)
    _add_cluster(p)
    p.set_defaults(run=_predict)

    p = sub.add_parser("export-onnx", help="add the ONNX graph (for ONNX Runtime) to an existing model folder")
    p.add_argument("--model", required=True, help="model folder (model.json + model.safetensors)")
    p.set_defaults(run=_export_onnx)

    p = sub.add_parser("worker", help="run one request from the QGIS plugin (JSON on stdin, JSON lines on stdout)")
    p.set_defaults(run=_worker)

    p = sub.add_parser("compare", help="difference raster and accuracy figures against a reference DSM")
    p.add_argument("--predicted", required=True, help="predicted height GeoTIFF")
    p.add_argument("--reference", required=True, help="reference DSM (any CRS and resolution)")
    p.add_argument("--out", help="output difference GeoTIFF (predicted - reference)")
    p.add_argument("--metrics", help="output metrics JSON")
    p.add_argument("--json", action="store_true", help="also print the overall metrics as one JSON line")
    p.add_argument("--reference-band", type=int, metavar="N",
                   help="band of the reference holding heights (1-based); required when it has several")
    p.set_defaults(run=_compare)

    p = sub.add_parser("train", help="train a U-Net / U-Net++ height model (a run folder, resumable)",
                       formatter_class=_DefaultsShown,
                       description="Train a height model. Patch size, batch size and steps per epoch left out follow "
                                   "the device: 256 px x 8 x 50 steps on a GPU (the paper's scale), 128 px x 4 x 20 "
                                   "steps on a CPU (a first epoch of the default net took 17 s on a 2-core CPU).")
    p.add_argument("--embeddings", help="64-band embeddings GeoTIFF")
    p.add_argument("--reference", help="reference DSM (any CRS and resolution)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("EMBEDDINGS", "REFERENCE"),
                   help="a further training pair (repeatable), split like the first")
    p.add_argument("--out", help="new run folder (model package, config, history, checkpoint, evaluation)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--arch", default="unetplusplus", choices=choices.ARCHITECTURES, help="network")
    p.add_argument("--encoder", default="resnet18", help="any segmentation-models-pytorch encoder")
    p.add_argument("--encoder-depth", type=int, default=5, help="encoder stages, 3-5")
    p.add_argument("--decoder-channels", help="comma-separated, one per encoder stage (default: the architecture's)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels (default: 256 on a GPU, 128 on a CPU)")
    p.add_argument("--batch-size", type=int, help="patches per micro-batch (default: 8 on a GPU, 4 on a CPU)")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step (memory is short)")
    p.add_argument("--epochs", type=int, default=30, help="epochs at most")
    p.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch (default: 50 on a GPU, 20 on a CPU)")
    p.add_argument("--max-minutes", type=float,
                   help="stop before an epoch that would end past this many minutes, keeping the best epoch "
                        "(default: no limit)")
    p.add_argument("--patience", type=int, default=6, help="epochs without validation gain before stopping")
    p.add_argument("--workers", type=int, help="processes reading patches by windows (default: one per 4 CPU "
                                                "cores, at most 4; 0 reads in the training process)")
    p.add_argument("--loss", default="mse", choices=choices.LOSSES, help="training loss")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--schedule", default="cosine", choices=choices.SCHEDULES, help="learning-rate schedule")
    _add_split(p, train=True)
    p.add_argument("--validation-embeddings", help="a separate validation pair: embeddings")
    p.add_argument("--validation-reference", help="a separate validation pair: reference DSM")
    p.add_argument("--terrain", metavar="copernicus-30|copernicus-90|FILE",
                   help="coarse terrain: the model learns height above it. copernicus-30 / copernicus-90: the "
                        "Copernicus DEM fetched for the embeddings (public COGs, cached); or a raster file")
    _add_dem_base_url(p)
    p.add_argument("--balance", action="store_true", help="draw patches so every height range is seen as often")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip scaling the uncertainty (TTA spread) into a 90 %% interval on the validation area")
    p.add_argument("--no-amp", action="store_true", help="full precision on CUDA (AMP is on by default there)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint/ once the run has finished")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the patch draws and a blocks split")
    p.add_argument("--name", help="model name written into the card (default: ARCH-ENCODER-OUT)")
    p.add_argument("--region", help="training region written into the card")
    p.add_argument("--year", type=int, help="embedding year written into the card")
    _add_device(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("evaluate", help="report (metrics, plots, ridge baseline) for a model on a referenced area")
    p.add_argument("--model", help="model folder; default: the bundled model")
    p.add_argument("--embeddings", required=True, help="64-band embeddings GeoTIFF")
    p.add_argument("--reference", required=True, help="reference DSM (any CRS and resolution)")
    p.add_argument("--out", required=True, help="new report folder")
    p.add_argument("--terrain", metavar="copernicus-30|copernicus-90|FILE", help=TERRAIN_HELP_PREDICT)
    _add_dem_base_url(p)
    p.add_argument("--uncertainty", action="store_true", help="also write uncertainty.tif (test-time augmentation)")
    _add_split(p, train=False)
    _add_device(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("calibrate", help="scale a model's uncertainty (TTA spread) into a 90 %% interval on the "
                                         "validation area of its training scene; recorded in its card")
    p.add_argument("--model", required=True, help="model folder (its card's split names the validation area)")
    p.add_argument("--embeddings", required=True, help="the embeddings the model was trained on")
    p.add_argument("--reference", required=True, help="the reference DSM it was trained on")
    p.add_argument("--terrain", metavar="copernicus-30|copernicus-90|FILE",
                   help="the coarse terrain, for models trained with --terrain")
    _add_dem_base_url(p)
    _add_device(p)
    p.set_defaults(run=_calibrate)

    p = sub.add_parser("correct", help="remove a prediction's regional bias using a few reference heights")
    p.add_argument("--predicted", required=True, help="predicted height GeoTIFF")
    p.add_argument("--out", required=True, help="output corrected height GeoTIFF")
    p.add_argument("--points", help="CSV with columns x,y,height")
    p.add_argument("--points-crs", help="CRS of the CSV's x,y (default: the prediction's)")
    p.add_argument("--reference", help="reference DSM raster to sample (with --window: only that patch)")
    p.add_argument("--window", nargs=4, type=int, metavar=("COL", "ROW", "WIDTH", "HEIGHT"),
                   help="patch of the prediction grid where --reference is used")
    p.add_argument("--method", default="auto", choices=choices.BIAS_METHODS,
                   help="auto: the one with the lowest cross-validated RMSE on the samples")
    p.add_argument("--check-reference", help="a reference over the whole area to report before/after metrics")
    p.set_defaults(run=_correct)

    p = sub.add_parser("experiment", help="the paper's experiment on the demo scene: U-Net vs U-Net++ vs ridge")
    p.add_argument("--out", default="experiment", help="new output folder (default experiment)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=25)
    p.add_argument("--scene-size", type=int, default=1024, help="demo scene side in pixels")
    p.add_argument("--device", default="cpu", choices=choices.DEVICES, help="default cpu (the documented budget)")
    p.set_defaults(run=_experiment)

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic scene")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--model", help="model folder; default: the bundled model")
    p.add_argument("--scene-only", action="store_true", help="only write the synthetic scene (for training)")
    _add_device(p)
    p.set_defaults(run=_demo)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``), taking the same clean-up path as Ctrl-C."""


def _terminate(signum: int, _frame: object) -> None:
    import signal

    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    if args.run is not _worker:  # the worker has its own SIGTERM handling (cancel at the next check)
        with contextlib.suppress(ValueError):  # not the main thread (main() called from a thread)
            signal.signal(signal.SIGTERM, _terminate)
    try:
        run(args)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print(f"{PROG}: terminated; no partial output was kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except OSError as exc:  # a write that failed outside the checked writers (history.csv, a plot)
        line = _os_error_line(exc)
        if line is None:
            raise
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    return 0


def _os_error_line(exc: OSError) -> Optional[InputError]:
    """A full disk or a read-only folder as one line; None for anything else (a bug: keep the traceback)."""
    import errno

    from .plugin.core.rasters import DISK_FULL_ERRNOS, disk_full_error

    where = exc.filename or "output"
    if exc.errno in DISK_FULL_ERRNOS:
        return disk_full_error(where, too_large=exc.errno == errno.EFBIG)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(where, f"cannot be written ({exc.strerror})", "Choose another folder or change its permissions")
    return None


if __name__ == "__main__":
    sys.exit(main())
